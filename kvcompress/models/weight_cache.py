"""On-disk cache of converted GGUF models, as ordinary Hugging Face model directories.

Reading a GGUF (parsing its tokenizer metadata three times over, dequantising every
tensor) takes seconds; a converted directory (config.json, model.safetensors, tokenizer)
loads in well under one. Entries are keyed by the source file's resolved path, size and
modification time, so replacing the file invalidates its entry without hashing gigabytes.
An entry is built in a temporary directory and renamed into place, so an entry that exists
is complete: a crash mid-way leaves only a stray ``.tmp-*`` directory, never a half entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "KVCOMPRESS_CACHE_DIR"
# Bump when the conversion changes, so that old entries are no longer used.
FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$KVCOMPRESS_CACHE_DIR`` if set, else the user cache directory for kvcompress."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # a declared dependency, but keep working without it
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "kvcompress"
    return Path(user_cache_dir("kvcompress"))


def _transformers_version() -> str:
    # The tokenizer files are written by transformers; another version may not read them.
    # importlib.metadata avoids importing transformers just to build a key.
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def entry_key(source: Path) -> str:
    resolved = source.resolve()
    st = resolved.stat()
    ident = (
        f"v{FORMAT_VERSION}|{resolved}|{st.st_size}|{st.st_mtime_ns}|"
        f"transformers {_transformers_version()}"
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def entry_dir(source: Path, root: Path | None = None) -> Path:
    root = cache_root() if root is None else root
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.stem)[:64]
    return root / "gguf" / f"{stem}-{entry_key(source)}"


def get_or_create(
    source: Path, build: Callable[[Path], None], root: Path | None = None
) -> tuple[Path, bool]:
    """The cache directory for ``source``, built with ``build(tmp_dir)`` on a miss.

    Returns ``(directory, hit)``. ``build`` writes into an empty temporary directory.
    """
    final = entry_dir(source, root)
    if final.is_dir():
        return final, True
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary directory
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False
