"""What the two tools/ scripts share (`dqo_megatron.cli.megatron_flags`): one parser class whose errors are
one line with exit 2, the epilog laid out as written, `note:` lines on stderr, and the scripts still run
as `python tools/<name>.py` where the package is not installed (they find it at the repository root)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dqo_megatron.cli.megatron_flags import MegatronFlagParser, flag_parser, print_notes
from tests.test_tools import _tool

REPO = Path(__file__).resolve().parents[1]

# a bad flag of each tool and what its one-line error says
BAD_FLAGS = {
    "preprocess_data": (
        ["--input", "r.jsonl", "--output-prefix", "d", "--tokenizer-model", "t", "--json-keys", "question"],
        "records are read by their fields",
    ),
    "convert_checkpoint": (
        ["--loader", "mcore", "--saver", "mcore", "--load-dir", "a", "--save-dir", "b"],
        "no resharding step",
    ),
}


def test_shared_parser_errors_in_one_line_and_keeps_the_epilog(capsys):
    p = flag_parser("tool.py", "Does a thing.", "Where it differs:\n  --x    this\n         and that\n")
    assert isinstance(p, MegatronFlagParser) and p.formatter_class is argparse.RawDescriptionHelpFormatter
    p.add_argument("--x", required=True)
    with pytest.raises(SystemExit) as exc:
        p.parse_args([])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == "tool.py: error: the following arguments are required: --x\n"
    assert "  --x    this\n         and that\n" in p.format_help()
    print_notes(["one", "two"])
    assert capsys.readouterr().err == "note: one\nnote: two\n"


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_both_tools_use_the_shared_parser(name, capsys):
    tool = _tool(name)
    assert type(tool.parser()) is MegatronFlagParser
    argv, said = BAD_FLAGS[name]
    with pytest.raises(SystemExit) as exc:
        tool.to_our_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"{name}.py: error: ") and said in err and err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_tools_run_from_a_clone_without_the_package_installed(name, tmp_path):
    # -S: no site processing, so the editable install's finder is gone and only the script's own path
    # insert can find dqo_megatron; PYTHONPATH keeps the third-party packages importable
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"}
    argv, said = BAD_FLAGS[name]
    proc = subprocess.run(
        [sys.executable, "-S", str(REPO / "tools" / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2 and said in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
