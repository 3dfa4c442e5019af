"""Which files go to LFS and which are ignored: .gitattributes and .gitignore globs, matched as git does."""

from __future__ import annotations

import re
from dataclasses import dataclass

# What huggingface.co writes in the "initial commit" of a new repo: it decides which files go to LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a gitignore/gitattributes glob; a pattern without an inner slash matches at any depth."""
    anchored = "/" in pattern.rstrip("/")
    pattern = pattern.strip("/")
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile(("" if anchored else "(?:.*/)?") + "".join(out))


def _lfs_patterns(gitattributes: str) -> list[re.Pattern[str]]:
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(_glob_regex(fields[0]))
    return patterns


@dataclass(frozen=True)
class _IgnoreRule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


class _GitIgnore:
    """Enough of .gitignore semantics for the preupload ``shouldIgnore`` answer (last match wins)."""

    def __init__(self, text: str) -> None:
        self.rules: list[_IgnoreRule] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line.removeprefix("!")
            self.rules.append(_IgnoreRule(_glob_regex(line), negate, line.endswith("/")))

    def ignores(self, path: str) -> bool:
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            candidate, is_dir = "/".join(parts[:depth]), depth < len(parts)
            verdict = False
            for rule in self.rules:
                if (is_dir or not rule.dir_only) and rule.regex.fullmatch(candidate):
                    verdict = not rule.negate
            if verdict:  # git never looks inside an ignored folder
                return True
        return False
