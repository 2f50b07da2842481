"""Loading by name/path (offline), VLMAccelerator(model) alone, the CLI and the prefill benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image

from vlmfast import InputError, VLMAccelerator
from vlmfast.cli import main
from vlmfast.zoo import resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-llava-onevision", "tiny-random-qwen2-vl",
                                  "tiny-random-qwen2.5-vl", "tiny-random-qwen3-vl", "tiny-random-internvl"])
def test_from_pretrained_zoo_name_and_local_folder(name):
    acc = VLMAccelerator.from_pretrained(name, policy=None)
    out = acc.generate(images=[make_image(0)], prompt="what is in the image ?", max_new_tokens=4)
    assert out.stats.visual_tokens_in > 0 and len(out.token_ids) <= 4
    # the same folder by path, offline, and VLMAccelerator(model) loading the processor from the model's path
    acc2 = VLMAccelerator.from_pretrained(resolve(name), policy=None, local_files_only=True)
    acc3 = VLMAccelerator(acc2.model)
    assert "no shipped policy" in acc3.policy_origin
    assert acc3.generate(images=[make_image(0)], prompt="what is in the image ?", max_new_tokens=4).token_ids \
        == out.token_ids


@pytest.mark.parametrize("name, folder, policy", [
    ("tiny-random-qwen2.5-vl", "Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b"),
    ("tiny-random-qwen3-vl", "Qwen3-VL-8B-Instruct", "qwen3-vl-8b"),
    ("tiny-random-llava-next", "llava-v1.6-mistral-7b-hf", "llava-v1.6-mistral-7b"),  # the image's 25%, over 2 views
    ("tiny-random-llava-onevision", "llava-onevision-qwen2-7b-ov-hf", "llava-onevision-qwen2-7b"),
    ("tiny-random-internvl", "InternVL3-8B-hf", "internvl3-8b"),
])
def test_cli_generate_on_a_folder_picks_the_shipped_policy_by_name(name, folder, policy, tmp_path, capsys):
    """A folder named like the hub checkpoint (a copy of the tiny model) gets that checkpoint's shipped policy
    (FoPru keeping 25%) from ``--policy auto``, through the CLI."""
    import shutil

    path = tmp_path / folder
    shutil.copytree(resolve(name), path)
    rc = main(["generate", "--model", str(path), "--image", str(ROOT / "examples" / "shapes.png"),
               "--prompt", "what objects do you see ?", "--max-new-tokens", "3", "--local-files-only", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["policy"]["name"] == policy and data["policy"]["methods"][0]["method"] == "fopru"
    assert data["stats"]["visual_tokens_kept"] == data["stats"]["visual_tokens_in"] // 4


def test_from_pretrained_missing_model_is_a_clear_error():
    with pytest.raises(InputError, match="cannot load 'nobody/no-such-model' \\(local_files_only=True\\)"):
        VLMAccelerator.from_pretrained("nobody/no-such-model", local_files_only=True)


def test_cli_generate_prints_answer_and_stats(capsys):
    rc = main(["generate", "--model", "tiny-random-llava", "--policy", "llava-1.5-7b",
               "--image", str(ROOT / "examples" / "shapes.png"), "--prompt", "what objects do you see ?",
               "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "answer:" in out and "fopru @ vision" in out and "64 -> 16" in out and "KV cache (bytes)" in out


def test_cli_generate_json_and_errors(capsys):
    rc = main(["generate", "--model", "tiny-random-llava", "--policy", "none", "--prompt", "hi ?",
               "--max-new-tokens", "3", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["policy"]["methods"] == [] and "prefill_s" in data["stats"]
    rc = main(["generate", "--model", "tiny-random-llava", "--policy", "nope", "--prompt", "hi"])
    assert rc == 2 and "neither a shipped policy" in capsys.readouterr().err


def test_bench_prefill_quick_rows(tmp_path):
    path = tmp_path / "bench.json"
    rc = subprocess.run([sys.executable, "-m", "vlmfast", "bench", "prefill", "--quick", "--repeats", "1",
                         "--decode-tokens", "2", "--json", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert rc.returncode == 0, rc.stderr
    rows = json.loads(path.read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("full", 1.0)] + [
        (m, k) for m in ("fopru", "fastv") for k in (0.5, 0.25, 0.1)]
    keys = {"method", "keep", "visual_tokens_in", "visual_tokens_kept", "prefill_s", "speedup", "ideal_speedup",
            "decode_ms_per_token", "kv_bytes"}
    for r in rows:
        assert keys <= set(r)
        assert r["visual_tokens_kept"] == (r["visual_tokens_in"] if r["method"] == "full"
                                           else max(1, int(r["visual_tokens_in"] * r["keep"] + 1e-6)))
        assert r["ideal_speedup"] >= 1.0 - 1e-9
    full = rows[0]
    assert full["speedup"] == 1.0 and full["ideal_speedup"] == 1.0
    fopru10 = next(r for r in rows if r["method"] == "fopru" and r["keep"] == 0.1)
    assert fopru10["kv_bytes"] < full["kv_bytes"]
    assert "speedup" in rc.stdout and "fopru" in rc.stdout


def test_bench_prune_rows_cover_every_method():
    from vlmfast.bench import prefill as bench_prefill
    from vlmfast.bench import prune as bench_prune

    policy = {"name": "my-vflowopt", "methods": [{"method": "vflowopt", "keep": 0.25, "m": 2.0}]}
    rows = bench_prune.run(None, model="tiny-random-llava", limit=2, repeats=1, decode_tokens=2, keeps=(0.25,),
                           spec=bench_prefill.QUICK, progress=False, policies=[policy], split="final")
    methods = [r["method"] for r in rows]
    assert {(r["split"], r["scenes"]) for r in rows} == {("final", 2)}
    assert methods[-1] == "my-vflowopt" and rows[-1]["keep"] == pytest.approx(0.25, abs=0.02)  # the share it spent
    assert methods[0] == "full" and {"fopru", "vflowopt", "fastv", "pyramiddrop", "visionzip", "fastervlm",
                                     "divprune", "random", "zipvl-quant", "zipvl-evict"} <= set(methods)
    for r in rows:
        assert set(bench_prune.FIELDS) <= set(r)
        assert 0 <= r["vqa"] <= 1 and r["ideal_speedup"] >= 0.99
    quant = next(r for r in rows if r["method"] == "zipvl-quant")
    assert quant["kv_bytes"] < 0.5 * rows[0]["kv_bytes"]
    assert "zipvl-quant" in bench_prune.table(rows, markdown=True)


def test_tiny_llava_shapes_loads_by_name_offline_with_its_default_policy():
    from training.llava_shapes import vocabulary
    from vlmfast.zoo import SHIPPED

    if not (SHIPPED["tiny-llava-shapes"][0] / "config.json").is_file():
        pytest.skip("tiny-llava-shapes weights are not in this checkout")
    acc = VLMAccelerator.from_pretrained("tiny-llava-shapes", local_files_only=True)
    assert "tiny-llava-shapes" in acc.policy_origin and acc.policy.methods[0].keep == 0.25
    out = acc.generate(images=[str(ROOT / "examples" / "shapes.png")], prompt="what colour is the cross ?",
                       max_new_tokens=4)
    assert out.stats.visual_tokens_in == 144 and out.stats.visual_tokens_kept == 36
    assert out.text and set(out.text.split()) <= set(vocabulary())
