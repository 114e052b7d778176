"""bench/distill.py's bookkeeping: what the full protocol is, what is left out, --resume."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("distill")


def _rows(bench, datasets, fractions=(1.0, 0.1), seeds=(0, 1, 2), arms=None, teacher="litemedsam"):
    return [{"teacher": teacher, "dataset": d, "fraction": f, "seed": s, "arm": a, "test_accuracy": 0.5,
             "device": "CPU (test)"}
            for d in datasets for f in fractions for s in seeds for a in (arms or bench.ARMS)]


def test_the_full_protocol_is_every_main_arm_data_set_fraction_and_seed(bench):
    settings = bench.run_settings(bench.parse_args([]))
    assert bench.protocol_gaps(_rows(bench, ["mri", "ct", "fashion-mnist"]), settings) == []
    gaps = bench.protocol_gaps(_rows(bench, ["ct"]), settings)
    assert gaps == ["mri 100% labels: not run", "mri 10% labels: not run",
                    "fashion-mnist 100% labels: not run", "fashion-mnist 10% labels: not run"]
    partial = _rows(bench, ["mri", "ct", "fashion-mnist"])
    partial = [r for r in partial if not (r["dataset"] == "ct" and r["arm"] == "lora" and r["seed"] == 2)]
    assert bench.protocol_gaps(partial, settings) == ["ct 100% labels: lora seed 2 not run",
                                                      "ct 10% labels: lora seed 2 not run"]


def test_another_teacher_owes_every_arm_but_scratch_and_other_settings_are_named(bench):
    settings = bench.run_settings(bench.parse_args([]))
    assert len(bench.protocol_gaps([], settings)) == 6  # nothing run: the default teacher's protocol
    teacher_arms = [a for a in bench.ARMS if a != "scratch"]
    rows = _rows(bench, ["mri", "ct", "fashion-mnist"], arms=teacher_arms, teacher="litemedsam@256")
    assert bench.protocol_gaps(rows, settings) == []
    rows = [r for r in rows if not (r["dataset"] != "mri" and r["arm"] == "lora")]
    assert bench.protocol_gaps(rows, settings) == [
        "litemedsam@256 ct 100% labels: lora seed 0, lora seed 1, lora seed 2 not run",
        "litemedsam@256 ct 10% labels: lora seed 0, lora seed 1, lora seed 2 not run",
        "litemedsam@256 fashion-mnist 100% labels: lora seed 0, lora seed 1, lora seed 2 not run",
        "litemedsam@256 fashion-mnist 10% labels: lora seed 0, lora seed 1, lora seed 2 not run"]
    capped = bench.run_settings(bench.parse_args(["--max-train", "2000", "--no-augment"]))
    gaps = bench.protocol_gaps(_rows(bench, ["mri", "ct", "fashion-mnist"]), capped)
    assert gaps == ["settings other than the protocol's: {'augment': False, 'max_train': 2000}"]


def test_resume_pools_only_runs_measured_the_same_way(bench, tmp_path):
    out = tmp_path / "distill.json"
    args = bench.parse_args(["--resume", "--output", str(out), "--datasets", "ct"])
    assert bench.load_previous(args) == {}  # nothing there yet: start afresh
    bench.write_results(args, _rows(bench, ["ct"], seeds=(0,)), {"ct": "x"}, "python bench/distill.py", True)
    previous = bench.load_previous(args)
    assert len(previous["runs"]) == 2 * len(bench.ARMS) and previous["complete"] is False
    assert "run stopped" not in " ".join(previous["left_out"])
    other = bench.parse_args(["--resume", "--output", str(out), "--max-train", "100"])
    with pytest.raises(bench.UserError, match="was measured with"):
        bench.load_previous(other)
    assert bench.load_previous(bench.parse_args(["--output", str(out)])) == {}  # no --resume: afresh
    json.loads(out.read_text())  # a whole file, written atomically


def test_an_arm_with_the_config_of_a_run_already_made_is_recorded_not_retrained(bench):
    args = bench.parse_args([])
    base = {"teacher": "litemedsam", "dataset": "ct", "fraction": 0.1, "seed": 1}

    def row(arm, **changes):
        return {**base, "arm": arm, "recipe": bench.recipe_identity(args, "ct", "litemedsam", arm), **changes}

    with_logit = row("rd-with-logit", test_accuracy=0.61)
    paper = row("rd-paper", fraction=1.0, test_accuracy=0.8)
    rows = [with_logit, paper, row("kd", test_accuracy=0.7), row("rd-with-logit", seed=2, test_accuracy=0.5)]
    # rd's defaults: the paper's loss plus the logit term, which is on only with a transfer set.
    assert bench.same_run(args, rows, row("rd")) is with_logit  # 10% labels: a transfer set
    assert bench.same_run(args, rows, row("rd", fraction=1.0)) is paper  # every label: no term
    assert bench.same_run(args, rows, row("rd-paper")) is None  # the paper's loss has no logit term
    assert bench.same_run(args, rows, row("rd", seed=3)) is None  # another seed
    assert bench.same_run(args, rows, row("scratch")) is None  # another recipe
    no_transfer = bench.parse_args(["--no-transfer"])  # 10% labels alone: no transfer set either
    assert bench.same_run(no_transfer, rows, row("rd")) is None


def test_ablations_take_one_part_from_the_paper_rd_whatever_rds_defaults_are(bench):
    args = bench.parse_args([])
    paper = bench.recipe_identity(args, "ct", "litemedsam", "rd-paper")
    assert paper["logit_weight"] == 0 and paper["teacher_ce_weight"] > 0 and paper["cka_weight"] > 0
    for arm, (key, value) in {"rd-no-cotrain": ("teacher_ce_weight", 0), "rd-no-cka": ("cka_weight", 0),
                              "rd-no-shared-head": ("shared_head", False),
                              "rd-with-logit": ("logit_weight", 1)}.items():
        ablated = bench.recipe_identity(args, "ct", "litemedsam", arm)
        assert {k for k in paper if ablated[k] != paper[k]} == {key} and ablated[key] == value, arm


def test_rows_trained_with_an_older_default_are_kept_apart_and_trained_again(bench, tmp_path):
    """Rows from before rows recorded their recipe config were trained with rd's logit term off:
    on --resume the 10%-label rd rows (their arm now means the term on) and the rows of a dropped
    arm leave the summary for superseded_runs; rd-paper's rows and rd's full-label rows (no
    transfer set, so no term) trained what their arm means now and stay."""
    out = tmp_path / "distill.json"
    args = bench.parse_args(["--resume", "--output", str(out), "--datasets", "ct"])
    legacy = _rows(bench, ["ct"], fractions=(0.1, 1.0), seeds=(0,), arms=["rd-paper", "rd", "kd"])
    legacy.append({**legacy[0], "arm": "rd-no-logit"})  # an arm since dropped
    out.write_text(json.dumps({"settings": bench.run_settings(args), "device": "CPU (old)", "runs": legacy}))
    previous = bench.load_previous(args)
    recipes = {(r["arm"], r["fraction"]): r["recipe"] for r in previous["runs"]}
    assert recipes["rd", 0.1]["logit_weight"] == recipes["rd-paper", 0.1]["logit_weight"] == 0
    assert recipes["rd-no-logit", 0.1] is None
    current, superseded = bench.split_superseded(args, previous["runs"])
    assert {(r["arm"], r["fraction"]) for r in superseded} == {("rd", 0.1), ("rd-no-logit", 0.1)}
    assert len(current) == len(legacy) - 2
    bench.write_results(args, current, {}, "python bench/distill.py", True, superseded)
    written = json.loads(out.read_text())
    assert ("rd", 0.1) not in {(s["arm"], s["fraction"]) for s in written["summary"]}
    assert ("rd", 1.0) in {(s["arm"], s["fraction"]) for s in written["summary"]}
    assert len(written["superseded_runs"]) == 2
    # The run trained again counts; of two current rows for one run, the later.
    rerun = {**superseded[0], "recipe": bench.recipe_identity(args, "ct", "litemedsam", "rd")}
    later = {**rerun, "test_accuracy": 0.6}
    current, superseded = bench.split_superseded(args, [superseded[0], *current, rerun, later])
    assert later in current and rerun in superseded and rerun not in current


def test_the_file_names_every_device_its_runs_trained_on(bench, tmp_path):
    out = tmp_path / "distill.json"
    args = bench.parse_args(["--resume", "--output", str(out)])
    rows = _rows(bench, ["ct"], seeds=(0,))
    rows[0]["device"] = "CUDA (a GPU); features and latency on CPU (test)"
    bench.write_results(args, rows, {}, "python bench/distill.py", True)
    assert json.loads(out.read_text())["device"] == "CPU (test); CUDA (a GPU); features and latency on CPU (test)"
    # A file written before rows named their device: each row takes the file's device on --resume.
    legacy = json.loads(out.read_text())
    legacy["device"] = "CPU (old, 2 threads)"
    for row in legacy["runs"]:
        del row["device"]
    out.write_text(json.dumps(legacy))
    assert {r["device"] for r in bench.load_previous(args)["runs"]} == {"CPU (old, 2 threads)"}


def test_training_on_a_gpu_that_is_not_there_is_a_one_line_error(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(bench.UserError, match="no CUDA GPU"):
        bench.main(["--device", "cuda", "--output", str(tmp_path / "d.json")])
    assert bench.device_description("cpu").startswith("CPU (")


def test_a_resumed_results_file_keeps_every_command_that_made_it(load_bench):
    results = load_bench("_results")
    first = results.command_history({}, "bench/tskd.py", [])
    assert first == "python bench/tskd.py"
    both = results.command_history({"command": first}, "bench/tskd.py", ["--resume", "--override", "a=b c"])
    assert both == "python bench/tskd.py && python bench/tskd.py --resume --override 'a=b c'"


def test_merge_pools_another_files_runs_and_trains_nothing(bench, tmp_path, capsys):
    """--merge adds the runs --output lacks from a file measured with the same settings (a GPU's
    share of the protocol, say), keeps ours where both have a run, and keeps both histories."""
    ours, theirs = tmp_path / "distill.json", tmp_path / "gpu.json"
    args = bench.parse_args(["--output", str(ours)])
    bench.write_results(args, _rows(bench, ["ct"], seeds=(0,)), {"ct": "crop"}, "python bench/distill.py", True)
    gpu_rows = _rows(bench, ["ct"], seeds=(0, 1), arms=["lora"])
    for row in gpu_rows:
        row.update(test_accuracy=0.9, device="CUDA (a GPU)")
    bench.write_results(bench.parse_args(["--output", str(theirs)]), gpu_rows, {"ct": "crop"},
                        "python bench/distill.py --device cuda", True)
    assert bench.main(["--output", str(ours), "--merge", str(theirs), "--datasets", "no-such-data"]) == 0
    merged = json.loads(ours.read_text())
    lora = {(r["fraction"], r["seed"]): r["test_accuracy"] for r in merged["runs"] if r["arm"] == "lora"}
    assert lora == {(1.0, 0): 0.5, (0.1, 0): 0.5, (1.0, 1): 0.9, (0.1, 1): 0.9}  # seed 0: ours kept
    # (rows without a recipe config are legacy: the old 10% rd row is superseded, not lost)
    assert len(merged["runs"]) + len(merged["superseded_runs"]) == 2 * len(bench.ARMS) + 2
    assert merged["command"].startswith("python bench/distill.py && [gpu.json] python bench/distill.py --device cuda")
    assert "CUDA (a GPU)" in merged["device"]
    assert "2 runs added, 2 already here" in capsys.readouterr().out


def test_merging_a_file_measured_another_way_is_a_one_line_error(bench, tmp_path):
    capped = tmp_path / "capped.json"
    bench.write_results(bench.parse_args(["--output", str(capped), "--max-train", "100"]),
                        _rows(bench, ["ct"], seeds=(0,)), {}, "python bench/distill.py --max-train 100", True)
    args = bench.parse_args(["--output", str(tmp_path / "d.json"), "--merge", str(capped)])
    with pytest.raises(bench.UserError, match="--merge: .*capped.json was measured with"):
        bench.merge_results(args, [], [], {})
    (tmp_path / "broken.json").write_text("{")
    args = bench.parse_args(["--output", str(tmp_path / "d.json"), "--merge", str(tmp_path / "broken.json")])
    with pytest.raises(bench.UserError, match="cannot read"):
        bench.merge_results(args, [], [], {})


def test_the_table_shows_spread_over_seeds_and_marks_a_single_run(bench, capsys):
    rows = _rows(bench, ["ct"], fractions=(1.0,), seeds=(0, 1), arms=["kd", "rd"])
    rows[0]["test_accuracy"] = 0.7  # kd seed 0: 0.7, seed 1: 0.5 -> 0.6 ± 0.141
    rows += _rows(bench, ["ct"], fractions=(1.0,), seeds=(0,), arms=["lora"])
    bench.print_table(bench.summarise(rows))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "0.6000±0.141" in line and "0.5000±0.000" in line and "0.5000 (1 run)" in line
    assert line.endswith("no (kd)")
