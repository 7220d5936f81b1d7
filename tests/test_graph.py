"""generate_graph.py: PNGs from a synthetic log (with blank cells), optional val.csv and gates, clean errors."""
import csv
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import generate_graph as G  # noqa: E402
from config import ConfigError  # noqa: E402
from metrics import LOG_COLUMNS  # noqa: E402


def write_log(run_dir, rows=40, gates=("refiner0_mean", "final0_max"), blank_buckets=False, stats=True):
    """A log.csv with train.py's columns; stats=False: grad_norm etc. constant or blank (no stats.png)."""
    os.makedirs(run_dir, exist_ok=True)
    columns = LOG_COLUMNS + [f"gate_{g}" for g in gates]
    with open(os.path.join(run_dir, "log.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, columns, restval="")
        w.writeheader()
        for i in range(rows):
            loss = 0.5 * math.exp(-i / 10) + 0.05
            row = {"step": (i + 1) * 25, "epoch": i // 10, "loss": loss, "lr": 1e-3 * min(1, i / 5),
                   "grad_norm": 0.8 + 0.01 * i * stats, "images_per_s": 120.0, "nonfinite": 0}
            if not (blank_buckets or i % 7 == 3):
                row.update({f"loss_t{k}": loss * (0.5 + k / 2) for k in range(4)})
            row.update({f"gate_{g}": 0.1 * j + 0.01 * i for j, g in enumerate(gates) if i % 5 != 2})
            w.writerow(row)
    return run_dir


def assert_png(path):
    assert os.path.isfile(path), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_writes_all_graphs(tmp_path):
    run = write_log(str(tmp_path / "run"))
    with open(os.path.join(run, "val.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "val_loss", "val_loss_t0", "val_loss_t1", "val_loss_t2", "val_loss_t3"])
        w.writerow([500, 0.3, 0.1, 0.2, "", 0.5])
        w.writerow([1000, 0.2, 0.05, 0.15, 0.2, 0.4])
    written = G.make_graphs(run)
    assert [os.path.basename(p) for p in written] == ["loss.png", "loss_per_t.png", "gates.png", "stats.png"]
    for p in written:
        assert_png(p)
        assert os.path.dirname(p) == run


def test_skips_gates_and_empty_buckets(tmp_path):
    run = write_log(str(tmp_path / "run"), gates=(), blank_buckets=True, stats=False)
    written = G.make_graphs(run)
    assert [os.path.basename(p) for p in written] == ["loss.png"]
    assert_png(written[0])
    assert not os.path.exists(os.path.join(run, "gates.png"))


def test_reader_blank_cells_and_partial_rows(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss,lr\n1,0.5,\n2,,0.1\n3,0.3\n,0.2,0.1\n")   # blanks, short row, row without a step
    with open(path, "ab") as f:
        f.write(b"\xff\xfe\x00garbage\x81,\x9c\n")  # bytes that are not UTF-8 (a damaged disk, a stray write)
    cols = G.read_csv_columns(str(path))
    assert cols["step"] == [1.0, 2.0, 3.0]
    assert cols["loss"][0] == 0.5 and math.isnan(cols["loss"][1]) and cols["loss"][2] == 0.3
    assert math.isnan(cols["lr"][0]) and math.isnan(cols["lr"][2])
    smooth = G.ema_smooth([1.0, math.nan, 3.0], 0.5)
    assert smooth[0] == 1.0 and smooth[1] == 1.0                  # bias-corrected: starts at the value
    assert smooth[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def test_missing_and_empty_log_raise_one_line(tmp_path):
    with pytest.raises(ConfigError, match="log.csv: no such file"):
        G.make_graphs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.csv").write_text("step,epoch,loss\n")
    with pytest.raises(ConfigError, match="empty log"):
        G.make_graphs(str(tmp_path / "empty"))


def test_cli(tmp_path):
    missing = subprocess.run([sys.executable, "generate_graph.py", str(tmp_path / "missing")], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    run = write_log(str(tmp_path / "run"), rows=5)
    ok = subprocess.run([sys.executable, "generate_graph.py", run], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 4 graphs" in ok.stdout
    assert_png(os.path.join(run, "loss.png"))


def test_import_does_not_load_matplotlib():
    out = subprocess.run([sys.executable, "-c", "import sys, generate_graph, samplers; "
                          "print('matplotlib' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "False\n", out.stderr


def test_stats_png_plots_any_other_changing_column(tmp_path, monkeypatch):
    """A column added to the log (here param_norm) gets a panel in stats.png without plotting code; the
    loss, lr, bucket and gate columns and columns that never change (nonfinite 0, images_per_s) do not."""
    import matplotlib.axes
    run = write_log(str(tmp_path / "run"), rows=10, gates=("a_mean",))
    with open(os.path.join(run, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(run, "log.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]) + ["param_norm"])
        w.writeheader()
        w.writerows(dict(r, param_norm=10 + i) for i, r in enumerate(rows))
    titles = []
    real_set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: titles.append(label) or real_set_title(self, label, *a, **k))
    written = G.make_graphs(run)
    assert os.path.basename(written[-1]) == "stats.png"
    assert_png(written[-1])
    assert titles[-2:] == ["grad_norm", "param_norm"], titles


def test_infinite_cells_are_dropped_like_blank_ones():
    """An fp16 step that overflowed logs grad_norm inf: the line goes on through the finite points."""
    assert G._points([1, 2, 3, 4], [2.0, math.inf, -math.inf, 3.0]) == ([1, 4], [2.0, 3.0])
    assert G._points([1, 2], [math.nan, 1.0]) == ([2], [1.0])


def test_a_log_row_with_a_field_that_is_not_a_column_is_an_error(tmp_path):
    from metrics import CSVLog
    log = CSVLog(str(tmp_path / "log.csv"), None, LOG_COLUMNS)
    log.write({"step": 1, "loss": 0.5})
    with pytest.raises(ValueError, match="no column param_norm"):  # not dropped without a word
        log.write({"step": 2, "loss": 0.4, "param_norm": 3.0})
    with open(tmp_path / "log.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]


def test_a_garbled_stretch_costs_its_rows_not_the_graphs(tmp_path):
    """A stray quote (its field runs on past the csv module's 128 KiB limit) or one overlong garbage line
    in log.csv or val.csv: the rows around it still plot, no csv.Error."""
    run = write_log(str(tmp_path / "run"), rows=10)
    with open(os.path.join(run, "log.csv"), "a") as f:
        f.write('260,1,"0.5\n' + "x" * 200_000 + "\n275,1,0.25\n")
    with open(os.path.join(run, "val.csv"), "w") as f:
        f.write("step,val_loss\n100,0.3\n" + "9" * 200_000 + "\n250,0.2\n")
    cols = G.read_csv_columns(os.path.join(run, "log.csv"))
    assert cols["step"][:10] == [25.0 * (i + 1) for i in range(10)] and cols["step"][-1] == 275.0
    assert G.read_csv_columns(os.path.join(run, "val.csv"))["step"] == [100.0, 250.0]
    assert "loss.png" in [os.path.basename(p) for p in G.make_graphs(run)]


def test_a_log_saved_with_a_byte_order_mark_reads(tmp_path):
    """log.csv / val.csv saved from Excel ("CSV UTF-8") start with a BOM: the step column is still 'step' (it
    was '\ufeffstep', and the graphs an 'empty log' error)."""
    run = write_log(str(tmp_path / "run"), rows=5)
    path = os.path.join(run, "log.csv")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)
    assert G.read_csv_columns(path)["step"] == [25.0, 50.0, 75.0, 100.0, 125.0]
    assert "loss.png" in [os.path.basename(p) for p in G.make_graphs(run)]


def test_a_resumed_run_keeps_the_rows_of_a_log_with_a_bom_or_a_garbled_line(tmp_path):
    """train.py's CSVLog on resume reads the log as generate_graph.py does: a byte order mark dropped every row
    (no 'step' column), a stray quote with a long tail was a csv.Error traceback."""
    from metrics import CSVLog
    path = str(tmp_path / "log.csv")
    log = CSVLog(path, None, LOG_COLUMNS)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 0.5})
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data + b'4,0,"0.5\n' + b"x" * 200_000 + b"\n")
    CSVLog(path, 2, LOG_COLUMNS)  # resumed at step 2: the rows up to it stay, the later and damaged ones go
    with open(path, newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]
