"""The README's Python example is examples/example_python.py, and it runs."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_readme_shows_the_example():
    example = (ROOT / "examples" / "example_python.py").read_text()
    assert example in (ROOT / "README.md").read_text(), \
        "README.md does not contain the current text of examples/example_python.py"


def test_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "example_python.py")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "decoded to [513, 513] tokens" in result.stdout
