"""The pure packages import without trio, sockets or TLS (STYLE.md 2.1, 2.2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Importing only the package would check just its __init__ (relay/proto/__init__.py
# does not import control.py, and auth/ has no __init__.py at all), so the child
# also imports every module below it. walk_packages swallows a subpackage's
# ImportError, hence the explicit import_module of each name it yields.
_IMPORT_ALL = """\
import importlib, pkgutil, sys
{preload}
sys.modules[{forbidden!r}] = None
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
"""


@pytest.mark.parametrize("forbidden", ["trio", "socket", "ssl"])
@pytest.mark.parametrize("package", ["relay.proto", "relay.audit", "auth", "policies"])
def test_pure_package_is_sans_io(package: str, forbidden: str) -> None:
    """Every module of a pure package imports with *forbidden* unavailable."""
    # cryptography.x509 imports email.utils, which imports socket for a helper it
    # never calls here. Loading email.utils first keeps that one stdlib edge out of
    # the check; any socket import by auth itself (or anything else) still fails.
    preload = "import email.utils" if (package, forbidden) == ("auth", "socket") else ""
    code = _IMPORT_ALL.format(package=package, forbidden=forbidden, preload=preload)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT)
