"""Policy directories on disk: read the ``*.toml`` files, then the pure loader.

The pure :mod:`policies` package checks policy files from their bytes
(:func:`policies.load_policy_files`); reading them is this module's, like
``relay/pki_files.py`` for keys and certificates. A file larger than
:data:`policies.load.MAX_FILE_BYTES` is refused after reading one byte more
than that, never read whole.
"""

from __future__ import annotations

from pathlib import Path

from policies import Policy, PolicyError, load_policy_files
from policies.load import MAX_FILE_BYTES, MAX_FILES

__all__ = ["load_policy_dir", "read_policy_dir"]


def read_policy_dir(directory: Path) -> dict[str, bytes]:
    """The ``*.toml`` files of *directory*, by name, each at most MAX_FILE_BYTES.

    Raises:
        PolicyError: Not a readable directory, too many files, a file too big
            or unreadable.
    """
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix == ".toml")
    except OSError as exc:
        raise PolicyError(
            f"cannot read the policy directory {directory}: {exc.strerror}"
        ) from None
    if len(paths) > MAX_FILES:
        raise PolicyError(
            f"{len(paths)} policy files in {directory}, at most {MAX_FILES}"
        )
    files: dict[str, bytes] = {}
    for path in paths:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise PolicyError(f"cannot read: {exc.strerror}", file=path.name) from None
        if len(data) > MAX_FILE_BYTES:
            raise PolicyError(
                f"larger than {MAX_FILE_BYTES // 1024} KiB", file=path.name
            )
        files[path.name] = data
    return files


def load_policy_dir(directory: Path) -> Policy:
    """Read and check the policy in *directory*.

    Raises:
        PolicyError: See :func:`read_policy_dir` and :func:`load_policy_files`.
    """
    return load_policy_files(read_policy_dir(directory))
