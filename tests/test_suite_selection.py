"""The suite's names: ``pytest -k "npu or mps"`` (the README's way to run the platform contract tests) matches
substrings of file and test names, and "input" holds "npu", so only the platform tests' files may hold either."""
import os
import re

TESTS = os.path.dirname(os.path.abspath(__file__))
PLATFORM_FILES = ("test_npu_platform.py", "test_npu_kernels.py", "test_npu_tensor_parallel.py",
                  "test_mps_platform.py")


def test_only_the_platform_files_match_the_platform_keywords():
    stray = []
    for name in sorted(os.listdir(TESTS)):
        if not name.startswith("test_") or not name.endswith(".py") or name in PLATFORM_FILES:
            continue
        with open(os.path.join(TESTS, name)) as f:
            names = [name] + re.findall(r"^def (test_\w+)", f.read(), re.M)
        stray += [f"{name}: {n}" for n in names if "npu" in n.lower() or "mps" in n.lower()]
    assert not stray, stray
