"""tests/readme.py reads the README's command lines the way a shell would."""

import pytest

import readme

TEXT = """# Title

## Run it

```bash
# a comment line inside a block, not a heading
bash scripts/a.sh up            # trailing comment
curl -s 127.0.0.1:8000/x -d '{"tag": "#1"}' \\
     -H 'A: b'   # base64 "PNGs"
```

```python
print("not a shell command")
```

## Next

```bash
echo other
```
"""


def test_commands_join_continuations_and_drop_comments():
    assert readme.commands("Run it", TEXT) == [
        "bash scripts/a.sh up",
        """curl -s 127.0.0.1:8000/x -d '{"tag": "#1"}' -H 'A: b'""",
    ]
    assert readme.commands("Next", TEXT) == ["echo other"]


def test_an_unknown_section_names_the_known_ones():
    with pytest.raises(KeyError, match="'Run it'"):
        readme.section("Run", TEXT)


def test_the_readme_sections_the_tests_run_have_commands():
    assert readme.commands("Running on a Ray cluster")[0] == "bash scripts/cluster.sh up"
    assert sum(c.startswith("curl ") for c in readme.commands("Serving (Ray Serve)")) == 4
