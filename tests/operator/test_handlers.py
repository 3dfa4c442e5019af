"""What the operator asks of Kopf: no per-object state kept between watch events."""

from __future__ import annotations

import asyncio

import kopf

from dpo_operator.kopf_config import NoObjectMemories


def test_kopf_keeps_no_record_of_a_watched_object_between_its_events() -> None:
    memories = NoObjectMemories()
    memobase = kopf.Memo(cache="the cache")

    async def recall(uid: str) -> kopf.Memo:
        return (await memories.recall({"metadata": {"uid": uid}}, memobase=memobase)).memo

    first, again = asyncio.run(recall("a")), asyncio.run(recall("a"))
    assert first.cache == again.cache == "the cache", "each event's handlers see the operator's memo"
    assert first is not again and list(memories.iter_all_memories()) == [], "nothing is remembered"
