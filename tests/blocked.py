"""The start of a script that runs kldiv's CLI in a fresh interpreter where the packages named
in ``sys.argv[1]`` (comma-separated) cannot be imported, as on an install without their extra
(tests/package/test_wheel.py does the same on real installs): a finder ahead of all others
answers ModuleNotFoundError for them, as Python does for a package that is not installed. (A
None in sys.modules would not do: array-api-compat reads sys.modules.) The script goes on with
``main`` imported and ``sys.argv[2:]`` its own."""

PRELUDE = """
import sys

BLOCKED = set(sys.argv[1].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
from kldiv.cli import main
"""
