"""`outputs.atomic_write_file`: a file made by a writer callback (matplotlib's savefig) appears whole or not at
all, through a unique temporary sibling that keeps the suffix, and the eval report and the value-analysis
figures write their PNGs through it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dqo_megatron.analysis import plot
from dqo_megatron.eval import report
from dqo_megatron.outputs import atomic_write_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "fig.png"
    out.write_bytes(b"old")
    seen: list[Path] = []

    def broken(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write_file(out, broken)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"] and not seen[0].exists()


def test_two_writes_to_one_path_use_their_own_temporaries(tmp_path):
    out = tmp_path / "fig.png"
    names: list[Path] = []

    def outer(tmp: Path) -> None:
        names.append(tmp)
        tmp.write_bytes(b"outer")
        # a second writer of the same path while the first one is still writing (another process, say)
        atomic_write_file(out, lambda inner: (names.append(inner), inner.write_bytes(b"inner")))
        assert tmp.read_bytes() == b"outer"

    atomic_write_file(out, outer)
    assert names[0] != names[1] and all(n.parent == tmp_path and n.name.endswith(".png") for n in names)
    assert out.read_bytes() == b"outer"  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


def test_savefig_writes_a_png_through_it(tmp_path):
    plt = plot._pyplot()
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    out = plot._save(fig, plt, tmp_path / "sub" / "v.png")  # the format comes from the temporary's suffix
    assert out.read_bytes()[:8] == PNG_MAGIC and [p.name for p in out.parent.iterdir()] == ["v.png"]
    assert fig.number not in plt.get_fignums()


def test_a_failing_figure_keeps_the_old_one_and_closes(tmp_path):
    plt = plot._pyplot()
    fig, _ = plt.subplots(figsize=(1, 1))
    fig.savefig = lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone"))
    out = tmp_path / "v.png"
    out.write_bytes(b"old")
    with pytest.raises(OSError, match="disk gone"):
        plot._save(fig, plt, out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["v.png"]
    assert fig.number not in plt.get_fignums()


def test_eval_report_png_is_replaced_whole(tmp_path, monkeypatch):
    results = SimpleNamespace(to_dict=lambda: {"ok": True})
    monkeypatch.setattr(report, "markdown_report", lambda r: "# table\n")
    written: list[Path] = []

    def fake_png(r, path) -> None:
        written.append(Path(path))
        Path(path).write_bytes(PNG_MAGIC)

    monkeypatch.setattr(report, "write_png", fake_png)
    paths = report.write_reports(results, tmp_path)
    assert paths["png"].read_bytes() == PNG_MAGIC and written[0] != paths["png"] and written[0].suffix == ".png"

    def failing_png(r, path) -> None:
        Path(path).write_bytes(b"half")
        raise RuntimeError("no figure")

    monkeypatch.setattr(report, "write_png", failing_png)
    with pytest.raises(RuntimeError, match="no figure"):
        report.write_reports(results, tmp_path)
    assert paths["png"].read_bytes() == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "results.json", "results.md"]
