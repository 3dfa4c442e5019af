"""Who may do what on the local Hub, as huggingface.co decides it: tokens belong to a user and have a role, users
belong to organizations with a role, repos are public, private or gated.

- A token's role: ``read`` (reads only), ``write``, or ``fineGrained`` (what its scoped permissions grant:
  ``repo.content.read`` and ``repo.write`` on a user or organization, or on one repo).
- Writing into namespace X (create or delete a repo, commit, upload, branch, tag, settings) needs a token that may
  write and a user who is X or a ``write``/``admin`` member of organization X: else 403.
- A private repo is visible to its namespace's users only (the user, any member of the organization): to anyone
  else it looks missing (404 RepoNotFound; 401 without a token).
- A gated repo's files (``/resolve``) need its namespace's users or a user granted access: else 403 with
  ``X-Error-Code: GatedRepo`` (401 without a token), which huggingface_hub raises as GatedRepoError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .store import HubError

TokenRole = Literal["read", "write", "fineGrained"]
ORG_ROLES = ("read", "contributor", "write", "admin")
WRITE_ROLES = frozenset({"write", "admin"})
"""Organization roles that may write into the organization's repos."""
READ = "repo.content.read"
WRITE = "repo.write"


@dataclass(frozen=True)
class HubToken:
    """An access token as the Hub's token settings describe it."""

    user: str
    role: TokenRole = "write"
    scoped: Mapping[str, Collection[str]] = field(default_factory=dict)
    """fineGrained only: entity -> permissions (``repo.content.read``, ``repo.write``). An entity is a user or
    organization name (every repo of that namespace), or a repo id ``ns/name`` (``datasets/ns/name`` for a
    dataset)."""
    name: str = "local"
    """The token's display name (whoami's auth.accessToken.displayName)."""

    def __post_init__(self) -> None:
        if self.role not in ("read", "write", "fineGrained"):
            raise ValueError(f"token role {self.role!r}: read, write or fineGrained")


def _id(kind: str, name: str) -> str:
    return hashlib.sha1(f"{kind}:{name}".encode()).hexdigest()[:24]


class Accounts:
    """The tokens, users and organizations of one LocalHub, and its permission rules."""

    def __init__(self, tokens: Mapping[str, HubToken], orgs: Mapping[str, Mapping[str, str]]) -> None:
        self.tokens = dict(tokens)
        self.orgs = {org: dict(members) for org, members in orgs.items()}
        for org, members in self.orgs.items():
            for user, role in members.items():
                if role not in ORG_ROLES:
                    raise ValueError(f"role of {user} in {org}: {role!r} is not one of {', '.join(ORG_ROLES)}")

    def token(self, value: str) -> HubToken | None:
        return self.tokens.get(value)

    def role_in(self, user: str, namespace: str) -> str | None:
        """The user's role in a namespace: admin of their own, their role in an organization, else None."""
        if user == namespace and namespace not in self.orgs:
            return "admin"
        return self.orgs.get(namespace, {}).get(user)

    def _scoped(self, token: HubToken, kind: str, repo_id: str, permission: str) -> bool:
        """Whether a fine-grained token holds `permission` (repo.write implies reading) on the repo or its namespace."""
        entities = (repo_id.split("/")[0], repo_id if kind == "model" else f"{kind}s/{repo_id}")
        wanted = {permission, WRITE}
        return any(wanted & set(token.scoped.get(entity, ())) for entity in entities)

    def may_read(self, token: HubToken | None, kind: str, repo_id: str) -> bool:
        """Whether the caller sees a private repo: a user of its namespace, through a token that may read it."""
        if token is None or self.role_in(token.user, repo_id.split("/")[0]) is None:
            return False
        return token.role != "fineGrained" or self._scoped(token, kind, repo_id, READ)

    def write_refusal(self, token: HubToken, kind: str, repo_id: str) -> str | None:
        """Why the token may not write into repo_id (existing or not), or None when it may."""
        namespace = repo_id.split("/")[0]
        role = self.role_in(token.user, namespace)
        if role is None:
            return f"{token.user} is neither {namespace} nor a member of the organization {namespace}"
        if role not in WRITE_ROLES:
            return f"{token.user} is a {role} member of the organization {namespace} (writing needs write or admin)"
        if token.role == "read":
            return "this is a read token: writing needs a write token"
        if token.role == "fineGrained" and not self._scoped(token, kind, repo_id, WRITE):
            return f"this fine-grained token has no {WRITE} permission on {namespace} or {repo_id}"
        return None

    def check_write(self, token: HubToken, kind: str, repo_id: str, creating: bool = False) -> None:
        """403 as huggingface.co answers when the token may not write there."""
        why = self.write_refusal(token, kind, repo_id)
        if why is None:
            return
        if creating:
            message = f'You don\'t have the rights to create a {kind} under the namespace "{repo_id.split("/")[0]}"'
        else:
            message = f"You don't have the rights to write to {kind}s/{repo_id}"
        raise HubError(403, f"{message}: {why}")

    def check_gate(self, token: HubToken | None, kind: str, repo_id: str, repo: Mapping[str, Any]) -> None:
        """A gated repo's files: its namespace's users and the users granted access; GatedRepo for others."""
        if not repo.get("gated"):
            return
        if token is None:
            raise HubError(
                401,
                f"Access to {kind} {repo_id} is restricted. You must have access to it and be authenticated to "
                "access it. Please log in.",
                "GatedRepo",
            )
        if self.role_in(token.user, repo_id.split("/")[0]) is None and token.user not in repo.get("grants", ()):
            raise HubError(
                403,
                f"Access to {kind} {repo_id} is restricted and you are not in the authorized list. "
                f"Visit the repo's page to ask for access.",
                "GatedRepo",
            )

    def whoami(self, token: HubToken) -> dict[str, Any]:
        """The /api/whoami-v2 answer: the user, their organizations (roleInOrg) and the token's role."""
        access: dict[str, Any] = {"displayName": token.name, "role": token.role}
        if token.role == "fineGrained":
            scoped = []
            for entity, permissions in token.scoped.items():
                parts = entity.split("/")
                kind = "org" if entity in self.orgs else "user" if len(parts) == 1 else "model"
                if len(parts) == 3:
                    kind, entity = parts[0].removesuffix("s"), "/".join(parts[1:])
                scoped.append(
                    {"entity": {"_id": _id(kind, entity), "type": kind, "name": entity}, "permissions": [*permissions]}
                )
            access["fineGrained"] = {"canReadGatedRepos": True, "global": [], "scoped": scoped}
        orgs = [
            {
                "type": "org",
                "id": _id("org", org),
                "name": org,
                "fullname": org,
                "isEnterprise": False,
                "roleInOrg": members[token.user],
            }
            for org, members in sorted(self.orgs.items())
            if token.user in members
        ]
        return {
            "type": "user",
            "id": _id("user", token.user),
            "name": token.user,
            "fullname": token.user,
            "isPro": False,
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": access},
        }


@dataclass(frozen=True)
class RefusalAccounts:
    """Accounts that meet every refusal (tests of the Hub and of the trainer's preflight): `user`'s write, read
    and fine-grained (acme/scoped only) tokens, alice (in no organization) and bob; in the organization acme,
    `user` writes and bob reads."""

    user: str
    write: str
    read: str = "reader-token-0123456789"
    scoped: str = "fine-0123456789"
    outsider: str = "alice-token-0123456789"
    bob: str = "bob-token-0123456789"

    def tokens(self) -> dict[str, str | HubToken]:
        return {
            self.write: self.user,
            self.read: HubToken(self.user, "read"),
            self.scoped: HubToken(self.user, "fineGrained", scoped={"acme/scoped": [WRITE]}),
            self.outsider: "alice",
            self.bob: "bob",
        }

    def orgs(self) -> dict[str, dict[str, str]]:
        return {"acme": {self.user: "write", "bob": "read"}}
