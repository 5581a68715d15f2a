"""The command lines as a user runs them (fresh processes): --help, the path from samples to a table, and the
refusals that name the flag to fix them."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cgkernels.testing import build_clip_tokenizer
from cli_testdata import launch_two, save_pipeline_with_loras

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {name: ROOT / "python" / f"{name}.py" for name in ("sample", "evaluate", "train")}
sys.path.insert(0, str(ROOT / "python"))


def run(script: str, *args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPTS[script]), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _refused(result, *patterns):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, result.stderr), (pattern, result.stderr[-3000:])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_shows_a_line_per_flag_with_defaults_and_runnable_examples(script):
    module = __import__(script)
    parser = module.build_parser()
    for action in parser._actions:
        assert action.help, f"{script}.py {action.option_strings} has no help text"
    result = run(script, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    options = text[text.index("options:"):]
    for action in parser._actions:
        if action.default is None or isinstance(action.default, bool) or action.dest == "help":
            continue
        flag = action.option_strings[0]
        shown = options[options.index("\n  " + flag) + 1:].split("\n  -")[0]
        assert "default" in shown, f"{script}.py --help does not show the default of {flag}: {shown!r}"
    # Examples keep their line continuations: each "\" ends a line that the next, indented line continues.
    assert " \\\n    " in text, f"{script}.py --help example lost its line continuations"
    commands = re.findall(r"(?m)^ +(?:accelerate launch .*?)?(python python/\w+\.py (?:.*\\\n)*.*)$", text)
    assert commands, f"{script}.py --help has no example command"
    for command in commands:
        words = shlex.split(command.replace("\\\n", " "))
        if script != "train":  # train.py's synopsis lists alternatives (a|b) and optional groups ([...])
            parser.parse_args([w for w in words[2:] if w != "...same"])


def test_train_on_jsonl_without_its_format_names_the_flag(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"caption": "a cat", "image_0": "a.png", "image_1": "b.png", "label_0": 1}) + "\n")
    result = run("train", "--model", tmp_path / "no_model_here", "--dataset", pairs, "--output-dir", tmp_path / "o",
                 timeout=60)
    _refused(result, "--dataset-format jsonl")
    assert "Parquet magic bytes" not in result.stderr
    _refused(run("train", "--model", tmp_path / "m", "--dataset", pairs, "--rank", "0", "--dataset-format", "jsonl",
                 timeout=60), "rank must be > 0")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny SD1.5 pipeline with two LoRA files and a tiny PickScore-layout CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = save_pipeline_with_loras(tmp_path_factory.mktemp("cli"))
    tokenizer = build_clip_tokenizer(["a", "red", "blue", "circle", "square", "cat"], root / "tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "pickscore")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(root / "pickscore")
    (root / "prompts.txt").write_text("a red circle\na blue square\na red cat\n")
    return root


def test_swept_samples_to_a_table_on_one_and_two_processes(workspace, tmp_path):
    common = ["--model", workspace / "model", "--positive", workspace / "pos", "--negative", workspace / "neg",
              "--prompts", workspace / "prompts.txt", "--seeds", "0-1", "--steps", "2", "--sweep", "1,2",
              "--batch-size", "3", "--device", "cpu", "--no-progress"]
    for method in ("contrastive", "cfg"):  # the baseline sampled with --sweep too: plain CFG is sampled once
        result = run("sample", *common, "--guidance", method, "--out", tmp_path / "s" / method)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "s" / "cfg").glob("*.png"))) == 6
    assert (tmp_path / "s" / "contrastive" / "grids" / "contrastive_sweep.png").is_file()

    scorer = ["--scorer", "pickscore", "--pickscore-model", workspace / "pickscore", "--no-progress"]
    _refused(run("evaluate", "--images", tmp_path / "s" / "contrastive", "--baseline", tmp_path / "s" / "cfg"),
             "--scorer pickscore", "taste")  # the default scorer and ordinary prompts: refused before any work
    assert not (tmp_path / "s" / "cfg" / "scores").exists()

    result = run("evaluate", "--images", tmp_path / "s" / "contrastive", "--baseline", tmp_path / "s" / "cfg",
                 *scorer, "--out", tmp_path / "one")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "one" / "table.json").read_text())
    assert [(r["method"], r["strength"], r["pairs"], r["prompts"]) for r in rows] == [
        ("contrastive", 1.0, 6, 3), ("contrastive", 2.0, 6, 3)]
    for row in rows:
        low, high = row["win_rate_ci"]
        assert 0 <= low <= row["win_rate"] <= high <= 1 and row["win_rate_se"] >= 0
    assert "| pickscore | contrastive | 2 | 6 | 3 |" in (tmp_path / "one" / "table.md").read_text()
    assert (tmp_path / "one" / "win_rate.png").stat().st_size > 10_000

    # Two processes, nothing cached: the same table (scores agree to fp32 rounding across batch compositions).
    for folder in ("contrastive", "cfg"):
        for file in (tmp_path / "s" / folder / "scores").iterdir():
            file.unlink()
    stdout = launch_two(SCRIPTS["evaluate"], "--images", tmp_path / "s" / "contrastive", "--baseline",
                         tmp_path / "s" / "cfg", *scorer, "--out", tmp_path / "two", "--device", "cpu")
    assert stdout.count("| pickscore | contrastive |") == 2  # rank 0 alone prints the table
    two = json.loads((tmp_path / "two" / "table.json").read_text())
    for a, b in zip(rows, two):
        assert a["win_rate"] == b["win_rate"] and a["pairs"] == b["pairs"]
        assert a["mean_score"] == pytest.approx(b["mean_score"], rel=1e-5, abs=1e-5)
    caches = {p.name.split(".")[-2] for p in (tmp_path / "s").glob("*/scores/*.jsonl")}
    assert caches == {"rank0", "rank1"}  # both processes scored a share


def test_one_folder_sweep_and_baseline_choice(workspace, tmp_path):
    result = run("sample", "--model", workspace / "model", "--positive", workspace / "pos", "--negative",
                 workspace / "neg", "--prompt", "a red circle", "--seeds", "0,1", "--steps", "2", "--guidance",
                 "cfg,contrastive", "--sweep", "1,2", "--out", tmp_path / "s", "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    scorer = ["--scorer", "pickscore", "--pickscore-model", workspace / "pickscore", "--no-progress"]
    _refused(run("evaluate", "--images", tmp_path / "s", "--baseline", tmp_path / "s", *scorer),
             "several variants", "--baseline-method")
    result = run("evaluate", "--images", tmp_path / "s", "--baseline", tmp_path / "s", "--baseline-method", "cfg",
                 *scorer)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "s" / "eval" / "table.json").read_text())
    assert [(r["method"], r["strength"]) for r in rows] == [("contrastive", 1.0), ("contrastive", 2.0)]


def test_scorer_errors_name_the_flag(tmp_path, capsys):
    from PIL import Image

    for name in ("method", "base"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / name / "a.png")
        (tmp_path / name / "a.json").write_text(json.dumps({"prompt": "an astronaut", "seed": 0}))
    base = ["--images", tmp_path / "method", "--baseline", tmp_path / "base", "--no-progress"]
    (tmp_path / "HPS_v2.1.pt").write_bytes(b"")
    cases = [
        (["--scorer", "pickscore"], ["--pickscore-model"]),
        (["--scorer", "hpsv2", "--hpsv2-checkpoint", tmp_path / "HPS_v2.1.pt"], ["--hpsv2-tokenizer"]),
        (["--scorer", "hpsv2", "--hpsv2-checkpoint", tmp_path / "nowhere.pt"], ["nowhere.pt", "--hpsv2-checkpoint"]),
        (["--scorer", "aesthetic", "--aesthetic-clip", tmp_path], ["--aesthetic-head"]),
        (["--scorer", "imagereward", "--imagereward-checkpoint", tmp_path / "HPS_v2.1.pt", "--imagereward-med-config",
          tmp_path / "HPS_v2.1.pt"], ["--imagereward-tokenizer"]),
        (["--scorer", "clipscore"], ["--scorer: unknown clipscore"]),
    ]
    for args, patterns in cases[:2]:  # as a user runs it
        _refused(run("evaluate", *base, *args, timeout=60), *patterns)
    import evaluate as evaluate_cli  # the rest in this process

    for args, patterns in cases[2:]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_cli.main([str(a) for a in base + args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(re.search(p, err) for p in patterns), (patterns, err)
