"""README's Python examples run as written (keeps them true)."""
import pathlib
import re


def test_readme_python_blocks_run():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["step"] is not None and namespace["f"] is not None
