"""Checkpoint tests: round trip, Hugging Face loading, retention, and every fault a save or a load can meet.

    python -m pytest tests/test_checkpoint.py

Crashes are injected three ways: a subprocess that calls os._exit(9) inside the writer, a subprocess killed with
SIGKILL while it writes, and (in-process, at every filesystem step of a save) an exception that stops the save there.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import checkpoint
import errors
from checkpoint import (CheckpointError, check_tokenizer_matches, cleanup_partial, find_checkpoint, has_checkpoint,
                        load_for_inference, load_model, load_state, save_checkpoint)
from conftest import CHARS, TINY, TINY_CHARS, assert_same_weights, gpt2_bpe, same_weights, tiny_model
from hf import hf_config, hf_state_dict
from model import GPT, GPTConfig
from tokens import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = {"tokenizer": Tokenizer.char(TINY_CHARS).to_meta()}


def save(out_dir: Path, model: GPT, iter_num: int, is_best: bool = False, val_loss: float = 1.0) -> Path:
    extra = TOKENIZER | {"train": {"learning_rate": 1e-3}, "val_loss": val_loss}
    optimizer = {"state": {0: {"exp_avg": torch.full((3,), float(iter_num))}}, "param_groups": [{"lr": 1e-3}]}
    state = {"iter_num": iter_num, "best_val_loss": val_loss, "rng": {"torch": torch.get_rng_state()},
             "optimizer": optimizer}
    return save_checkpoint(out_dir, model, extra, state, iter_num=iter_num, is_best=is_best)


def entries(out_dir: Path) -> set[str]:
    return {p.name for p in out_dir.iterdir()}


def iteration(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["iter_num"]


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip(tmp_path: Path) -> None:
    model = tiny_model(0)
    rng = torch.get_rng_state()  # what save() stores
    folder = save(tmp_path, model, 80, is_best=True, val_loss=1.5)
    assert folder == tmp_path / "ckpt_000080"
    assert entries(folder) == {"model.safetensors", "config.json", "state.pt",
                               "tokenizer.json", "tokenizer_config.json"}
    assert os.readlink(tmp_path / "latest") == "ckpt_000080" and os.readlink(tmp_path / "best") == "ckpt_000080"

    for where in (tmp_path, tmp_path / "latest", folder):
        loaded, tokenizer, config = load_model(where)
        assert_same_weights(model, loaded)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again after loading
        assert not loaded.training
        assert tokenizer == Tokenizer.char(TINY_CHARS)
        assert config["iter_num"] == 80 and config["val_loss"] == 1.5 and config["train"] == {"learning_rate": 1e-3}
        assert config["smallgpt"] == json.loads(json.dumps(hf_config(model.config)["smallgpt"]))
        assert config["vocab_size"] == TINY["vocab_size"] and config["n_layer"] == 2
    assert find_checkpoint(tmp_path) == folder.resolve()
    assert load_model(tmp_path, dropout=0.25)[0].config.dropout == 0.25

    state = load_state(find_checkpoint(tmp_path))
    assert state["iter_num"] == 80 and state["best_val_loss"] == 1.5
    assert torch.equal(state["rng"]["torch"], rng)
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 80.0))
    assert has_checkpoint(tmp_path) and not has_checkpoint(tmp_path / "elsewhere")


def test_checkpoint_files_share_one_permission(tmp_path: Path) -> None:
    """safetensors writes its file 0600; a checkpoint's files all get what open() gives under the umask."""
    old = os.umask(0o022)
    try:
        folder = save(tmp_path, tiny_model(0), 1)
    finally:
        os.umask(old)
    assert {name: (folder / name).stat().st_mode & 0o777 for name in checkpoint.FILES} == \
        dict.fromkeys(checkpoint.FILES, 0o644)


def test_load_for_inference_picks_the_source_and_casts(tmp_path: Path) -> None:
    """The one preamble of sample.py, serve.py, eval.py and attention.py: init_from None or "resume" is out_dir."""
    model = tiny_model(0)
    save(tmp_path / "run", model, 1, is_best=True)
    for init_from, out_dir in ((None, tmp_path / "run"), ("resume", tmp_path / "run"), (str(tmp_path / "run"), "x")):
        loaded, tokenizer, config, source = load_for_inference(str(out_dir), init_from, "latest", torch.device("cpu"))
        assert_same_weights(model, loaded)
        assert not loaded.training and tokenizer == Tokenizer.char(TINY_CHARS) and config["iter_num"] == 1
        assert source == str(tmp_path / "run")
    half = load_for_inference(str(tmp_path / "run"), None, "best", torch.device("cpu"), torch.bfloat16)[0]
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(SystemExit, match="does not exist") as e:
        load_for_inference(str(tmp_path / "nothing"), None, "latest", torch.device("cpu"))
    assert "\n" not in str(e.value.code)


def test_optimizer_state_comes_back_exactly(tmp_path: Path) -> None:
    model = tiny_model(0)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(idx, idx)[1].backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
    save_checkpoint(tmp_path, model, TOKENIZER, state, iter_num=1, is_best=True)

    loaded, _, _ = load_model(tmp_path)
    restored = loaded.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    restored.load_state_dict(load_state(find_checkpoint(tmp_path))["optimizer"])
    for p, q in zip(model.parameters(), loaded.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], restored.state[q][key])
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)


def test_hub_names_are_not_paths(tmp_path: Path, fake_hub) -> None:
    gpt2_bpe()  # the code under test loads GPT-2's BPE: skip without its files
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257))  # GPT-2 BPE's size
    (tmp_path / "src").mkdir()
    safetensors.torch.save_file(hf_state_dict(model), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(hf_config(model.config)))
    fake_hub.repos["openai-community/gpt2-medium"] = tmp_path / "src"
    loaded, tokenizer, config = load_model("gpt2-medium", dropout=0.1)
    assert [repo for repo, _ in fake_hub.calls] == ["openai-community/gpt2-medium"] * 2
    assert loaded.config.dropout == 0.1 and not loaded.training and same_weights(loaded, model)
    assert tokenizer == gpt2_bpe() and config["n_embd"] == 32


def test_hub_offline_fails_fast_with_the_whole_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in the cache and the hub unreachable: one line at once, before huggingface_hub's retries (27 s), whose
    message came cut mid-word; the cache is read without the network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def hub(repo_id: str, filename: str, local_files_only: bool = False, **kwargs: object) -> str:
        asked.append(local_files_only)
        if not local_files_only:
            pytest.fail("went to the network although the hub cannot be reached")
        raise LocalEntryNotFoundError("not in the cache")

    def unreachable(address: tuple[str, int], timeout: float) -> None:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(SystemExit) as e:
        load_model("gpt2")
    assert e.value.code == ("could not download gpt2 from the Hugging Face hub: huggingface.co cannot be reached "
                            "(Network is unreachable). Offline? Download its config.json and model.safetensors "
                            "elsewhere and pass their folder instead of 'gpt2'") and asked == [True]

    long = "An error happened while trying to locate the file on the Hub and we cannot find the requested files " \
           "in the local cache. Please check your connection and try again or make sure your Internet connection is on."
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError(long)))
    with pytest.raises(SystemExit, match=re.escape(long)):  # whole, where it was cut at 160 characters
        load_model("gpt2")


def test_transformers_loads_our_checkpoint_and_we_load_theirs(tmp_path: Path) -> None:
    gpt2_bpe()  # the code under test loads GPT-2's BPE: skip without its files
    transformers = pytest.importorskip("transformers")
    model = tiny_model(1)
    save(tmp_path / "out", model, 10)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "latest").eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    with torch.no_grad():
        ours = model.eval()(idx)[0]
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-4

    # The other way: a folder written by transformers has no "tokenizer" entry, so it gets GPT-2 BPE.
    config = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(2)
    theirs_model = transformers.GPT2LMHeadModel(config).eval()
    theirs_model.save_pretrained(tmp_path / "hf")
    loaded, tokenizer, loaded_config = load_model(tmp_path / "hf")
    assert tokenizer == gpt2_bpe() and loaded_config["n_embd"] == 32
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (loaded(idx)[0] - theirs_model(idx).logits).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------- retention


def test_retention_keeps_latest_and_best(tmp_path: Path) -> None:
    models = {it: tiny_model(it) for it in (10, 20, 30, 40)}
    save(tmp_path, models[10], 10, is_best=True, val_loss=3.0)
    save(tmp_path, models[20], 20, is_best=True, val_loss=2.0)
    assert entries(tmp_path) == {"ckpt_000020", "latest", "best"}
    save(tmp_path, models[30], 30, is_best=False, val_loss=2.5)  # best stays behind when latest moves on
    assert entries(tmp_path) == {"ckpt_000020", "ckpt_000030", "latest", "best"}
    save(tmp_path, models[40], 40, is_best=False, val_loss=2.6)
    assert entries(tmp_path) == {"ckpt_000020", "ckpt_000040", "latest", "best"}
    assert_same_weights(load_model(tmp_path, "best")[0], models[20])
    assert_same_weights(load_model(tmp_path, "latest")[0], models[40])


def test_same_iteration_saved_twice_is_replaced(tmp_path: Path) -> None:
    save(tmp_path, tiny_model(1), 10, is_best=True, val_loss=2.0)
    second = tiny_model(2)
    save(tmp_path, second, 10, is_best=False, val_loss=1.0)  # e.g. an evaluation, then the end of training
    assert entries(tmp_path) == {"ckpt_000010", "latest", "best"}
    assert_same_weights(load_model(tmp_path, "latest")[0], second)
    assert load_model(tmp_path, "best")[2]["val_loss"] == 1.0


# -------------------------------------------------------------------------------------- crashes during a save


class Crash(BaseException):
    """Stops a save at one step, as a kill would. (save_checkpoint still removes its temporary folder on the way out,
    which a kill -9 cannot: the subprocess tests below check what a real kill leaves behind.)"""


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Make the step-th filesystem operation of the process raise Crash before it happens; returns the counter."""
    count = [0]

    def wrap(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                raise Crash
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapped)

    for name in ("rename", "replace", "symlink", "unlink", "mkdir", "rmdir"):
        wrap(os, name)
    wrap(safetensors.torch, "save_file")
    wrap(torch, "save")
    wrap(errors, "fsync")
    return count


@pytest.mark.parametrize("scenario", ["first save", "next save", "same iteration again"])
def test_crash_at_every_step_of_a_save_leaves_a_loadable_checkpoint(tmp_path: Path, scenario: str) -> None:
    old, new = tiny_model(10), tiny_model(20)
    new_iter = 10 if scenario == "same iteration again" else 20
    step, completed = 1, False
    while not completed:
        out = tmp_path / f"step{step}"
        if scenario != "first save":
            save(out, old, 10, is_best=True)
        with pytest.MonkeyPatch.context() as mp:
            counter = crash_at(mp, step)
            try:
                save(out, new, new_iter, is_best=True)
                completed = True
            except Crash:
                pass
        assert completed or counter[0] >= step  # the crash point was reached
        for which in ("latest", "best"):
            if not (out / which).is_symlink() and not (which == "latest" and has_checkpoint(out)):
                assert scenario == "first save"  # killed before the first link: nothing existed to lose
                continue
            folder = find_checkpoint(out, which)
            model, _, config = load_model(folder)
            assert same_weights(model, old) or same_weights(model, new)
            assert config["iter_num"] == (new_iter if same_weights(model, new) else 10)
            assert load_state(folder)["iter_num"] == config["iter_num"]
        # The next save cleans up whatever the crash left.
        save(out, tiny_model(30), 30, is_best=False)
        linked = {os.readlink(out / link) for link in ("latest", "best") if (out / link).is_symlink()}
        assert entries(out) == linked | {link for link in ("latest", "best") if (out / link).is_symlink()}
        step += 1
    assert step > 10  # the save really went through many steps, each of them crashed once


CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch, checkpoint
from pathlib import Path
from test_checkpoint import save, tiny_model

mode, out = sys.argv[1], Path(sys.argv[2])
real_save = torch.save
def die_in_torch_save(*args, **kwargs):
    os._exit(9)                                  # model.safetensors and config.json written, state.pt not
def die_in_point(*args, **kwargs):
    os._exit(9)                                  # ckpt_000020 renamed into place, `latest` not yet moved
def sleep_in_torch_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)                               # the parent sends SIGKILL now
if mode == "exit-before-state":
    torch.save = die_in_torch_save
elif mode == "exit-before-link":
    checkpoint._point = die_in_point
else:
    torch.save = sleep_in_torch_save
save(out, tiny_model(20), 20, is_best=True)
print("save completed", flush=True)
"""


@pytest.mark.parametrize("mode", ["exit-before-state", "exit-before-link", "sigkill-while-writing"])
def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path: Path, mode: str) -> None:
    previous = tiny_model(10)
    save(tmp_path, previous, 10, is_best=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
    child = subprocess.Popen([sys.executable, str(script), mode, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if mode == "sigkill-while-writing":
        assert child.stdout.readline() == "writing\n", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=120)
    assert child.returncode in (9, -signal.SIGKILL), child.stderr.read()

    left_behind = {name for name in entries(tmp_path) if name.startswith((".tmp-", "ckpt_000020"))}
    assert left_behind  # the kill did interrupt a save
    assert os.readlink(tmp_path / "latest") == "ckpt_000010"
    assert_same_weights(load_model(tmp_path)[0], previous)
    assert load_state(find_checkpoint(tmp_path))["iter_num"] == 10

    save(tmp_path, tiny_model(30), 30)
    assert entries(tmp_path) == {"ckpt_000010", "ckpt_000030", "latest", "best", "child.py"}


# ---------------------------------------------------------------------------------------------- a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)


def _half_written_safetensors(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\0" * 100)  # the disk filled up halfway through the file
    raise OSError(errno.ENOSPC, "No space left on device", str(filename))


@pytest.mark.parametrize("writer", ["safetensors", "torch.save", "symlink"])
def test_disk_full_is_a_clear_error_and_keeps_previous_checkpoint(tmp_path: Path, writer: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    previous = tiny_model(10)
    save(tmp_path, previous, 10, is_best=True)
    if writer == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", _half_written_safetensors)
    elif writer == "torch.save":
        monkeypatch.setattr(torch, "save", _enospc)
    else:
        monkeypatch.setattr(os, "symlink", _enospc)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, tiny_model(20), 20, is_best=True)
    message = str(info.value)
    assert str(tmp_path / "ckpt_000020") in message and "disk is full" in message
    assert f"the previous checkpoint {(tmp_path / 'ckpt_000010').resolve()} is intact" in message
    assert "\n" not in message
    assert not [name for name in entries(tmp_path) if name.startswith(".tmp-")]
    monkeypatch.undo()
    assert_same_weights(load_model(tmp_path)[0], previous)
    assert_same_weights(load_model(tmp_path, "best")[0], previous)


def test_first_save_on_full_disk_says_nothing_was_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises(CheckpointError, match="no earlier checkpoint existed"):
        save(tmp_path, tiny_model(0), 10)
    assert entries(tmp_path) == set()


# --------------------------------------------------------------------------------------- files from outside


def test_truncated_and_garbage_safetensors_are_refused(tmp_path: Path) -> None:
    folder = save(tmp_path, tiny_model(0), 10)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{weights}.*damaged"):
        load_model(tmp_path)
    weights.write_bytes(os.urandom(len(data)))
    with pytest.raises(ValueError, match=f"{weights}.*damaged"):
        load_model(tmp_path)


def test_bad_config_json_is_refused(tmp_path: Path) -> None:
    folder = save(tmp_path, tiny_model(0), 10)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{config_path} is not valid JSON"):
        load_model(tmp_path)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    with pytest.raises(ValueError, match=f"{config_path} lacks n_layer"):
        load_model(tmp_path)
    # A tokenizer with more tokens than the model has embeddings: the config belongs to another model.
    config["tokenizer"] = Tokenizer.char("".join(chr(c) for c in range(32, 132))).to_meta()
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{config_path}: its tokenizer has 100 tokens but the model {TINY['vocab_size']}"):
        load_model(tmp_path)
    # A char table with fewer symbols than the model's ids: those ids would print as U+FFFD.
    config["tokenizer"] = Tokenizer.char(CHARS).to_meta()
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"its tokenizer has {len(CHARS)} tokens but the model {TINY['vocab_size']}"):
        load_model(tmp_path)


NANOCHAT = dict(pos_embedding="rope", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2", bias=False,
                tie_embeddings=False, logit_softcap=15.0)  # the switches that make a model NanoChat's


@pytest.mark.parametrize("hf_folder", [False, True])  # with our "smallgpt" entry, or without it (Hugging Face's)
@pytest.mark.parametrize("key, value", [
    ("rope_parameters", "default"), ("rope_parameters", [10000.0]), ("rope_parameters", {"rope_theta": "1e4"}),
    ("rope_parameters", {"rope_theta": float("nan")}), ("hidden_size", None), ("hidden_size", {}),
    ("num_key_value_heads", True), ("train", ["lr", 1e-3]), ("tokenizer", "char"), ("iter_num", "10"),
    ("val_loss", [1.0]), ("smallgpt", {"rope_theta": float("inf")}), ("smallgpt", {"n_kv_head": 2.0}),
])
def test_config_json_entries_of_the_wrong_type_are_refused(tmp_path: Path, hf_folder: bool, key: str,
                                                           value: object) -> None:
    """Nested entries too, each with one line that names it, however deep it sits: checked once, on reading."""
    save(tmp_path, tiny_model(0, **NANOCHAT), 10)
    config_path = tmp_path / "latest" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["model_type"] == "nanochat"
    if hf_folder:
        del config["smallgpt"]
    config_path.write_text(json.dumps(config | {key: value}))
    name = key + "." + next(iter(value)) if isinstance(value, dict) and value else key
    with pytest.raises(ValueError, match=rf"config.json: {re.escape(name)}=.* is not (of type|a finite number)"):
        load_model(tmp_path)


@pytest.mark.parametrize("key, own_key", [("max_position_embeddings", None), ("max_position_embeddings", "block_size")])
def test_a_rope_models_context_is_bounded_by_its_weights_too(tmp_path: Path, key: str, own_key: str | None) -> None:
    """RoPE has no wpe to size block_size against, but its tables take block_size x head_dim numbers: a config.json
    with block_size 2^31 allocated them for 90 s, then failed for 64 GiB."""
    save(tmp_path, tiny_model(0, **NANOCHAT), 10)
    config_path = tmp_path / "latest" / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = 1 << 16  # 2^16 x head_dim 8 numbers: more than the tiny model's weights, yet quick to allocate
    if own_key:
        config["smallgpt"][own_key] = 1 << 16
    else:
        del config["smallgpt"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: its sizes make ~[\d,]+ weights, more than the"):
        load_model(tmp_path)


def test_missing_paths_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'} does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no checkpoint in {tmp_path / 'empty'}: train one with train.py "
                                         f"--out_dir={tmp_path / 'empty'}"):
        load_model(tmp_path / "empty")
    assert not has_checkpoint(tmp_path / "empty")
    save(tmp_path / "run", tiny_model(0), 10, is_best=False)
    with pytest.raises(ValueError, match="has no 'best' checkpoint"):
        find_checkpoint(tmp_path / "run", "best")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(tiny_model(0).config)))
    with pytest.raises(ValueError, match=f"{tmp_path / 'hf' / 'model.safetensors'} not found"):
        load_model(tmp_path / "hf")
    with pytest.raises(ValueError, match=f"{tmp_path / 'hf' / 'state.pt'} not found.*--init_from="):
        load_state(tmp_path / "hf")


def test_checkpoint_without_latest_link_is_still_found(tmp_path: Path) -> None:
    # What a kill between the first rename and the first link leaves.
    model = tiny_model(0)
    save(tmp_path, model, 10)
    (tmp_path / "latest").unlink()
    assert has_checkpoint(tmp_path)
    assert_same_weights(load_model(tmp_path)[0], model)


def test_link_to_a_deleted_checkpoint_names_what_is_left(tmp_path: Path) -> None:
    save(tmp_path, tiny_model(0), 10, is_best=True)
    save(tmp_path, tiny_model(1), 20, is_best=False)
    checkpoint._remove(tmp_path / "ckpt_000020")  # by hand, behind the links' back
    with pytest.raises(ValueError, match="latest points to .*ckpt_000020, which is not a complete checkpoint.*"
                                         "complete checkpoints in .*: ckpt_000010"):
        load_model(tmp_path)


def test_tokenizer_mismatch_is_refused(tmp_path: Path) -> None:
    meta_path = tmp_path / "meta.json"
    char_config = {"tokenizer": Tokenizer.char(CHARS).to_meta()}
    check_tokenizer_matches(char_config, {"tokenizer": Tokenizer.char(CHARS).to_meta()}, meta_path)
    check_tokenizer_matches({}, {"tokenizer": {"kind": "tiktoken", "encoding": "gpt2"}}, meta_path)  # HF folder
    with pytest.raises(ValueError, match=f"{meta_path} uses tokenizer tiktoken gpt2 but the checkpoint was trained "
                                         f"with char \\(65 symbols"):
        check_tokenizer_matches(char_config, {"tokenizer": {"kind": "tiktoken", "encoding": "gpt2"}}, meta_path)
    with pytest.raises(ValueError, match="char \\(64 symbols"):  # same kind, another table
        check_tokenizer_matches(char_config, {"tokenizer": Tokenizer.char(CHARS[1:]).to_meta()}, meta_path)


class _RunsCode:
    """Unpickling this would create a folder: the kind of object weights_only=True must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_state_with_foreign_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    folder = save(tmp_path, tiny_model(0), 10)
    marker = tmp_path / "code-ran"
    torch.save({"iter_num": 10, "payload": _RunsCode(marker)}, folder / "state.pt")
    with pytest.raises(ValueError, match=f"{folder / 'state.pt'} is refused: it holds Python objects.*os.makedirs"):
        load_state(folder)
    assert not marker.exists()
    (folder / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"{folder / 'state.pt'} is refused: the file is damaged"):
        load_state(folder)


def test_save_refuses_state_that_would_not_load(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    model = tiny_model(0)
    with pytest.raises(TypeError, match=r"state\['best_val_loss'\] is a numpy.float64"):
        save_checkpoint(tmp_path, model, TOKENIZER, {"best_val_loss": np.float64(1.0)}, iter_num=1, is_best=True)
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\] is a numpy.ndarray"):
        save_checkpoint(tmp_path, model, TOKENIZER, {"rng": ("MT19937", np.zeros(3))}, iter_num=1, is_best=True)
    assert not tmp_path.exists() or entries(tmp_path) == set()
    # Everything the check lets through does come back with weights_only=True.
    state = {"a": [1, 2.0, "x", None, True, (torch.ones(2),)], 3: {"b": torch.zeros(1, dtype=torch.bfloat16)}}
    save_checkpoint(tmp_path, model, TOKENIZER, state, iter_num=1, is_best=True)
    back = load_state(find_checkpoint(tmp_path))
    assert back["a"][:5] == [1, 2.0, "x", None, True] and torch.equal(back["a"][5][0], torch.ones(2))


def test_cleanup_partial_spares_live_writers_and_linked_folders(tmp_path: Path) -> None:
    save(tmp_path, tiny_model(0), 10)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-ckpt_000020-{int(dead.stdout)}"
    live = tmp_path / f".tmp-ckpt_000020-{os.getppid()}"  # our parent process is alive
    stale.mkdir()
    live.mkdir()
    cleanup_partial(tmp_path)
    assert not stale.exists() and live.exists()


def test_tokenizer_check_needs_no_bpe_files_for_a_char_model(monkeypatch, tmp_path):
    # Resuming a char-level run offline must not load GPT-2's BPE tables just to build a default.
    import tokens
    monkeypatch.setattr(tokens.Tokenizer, "tiktoken", classmethod(lambda cls, name: pytest.fail("loaded BPE")))
    char = {"kind": "char", "chars": "abc"}
    checkpoint.check_tokenizer_matches({"tokenizer": char}, {"tokenizer": char}, tmp_path / "meta.json")
    with pytest.raises(ValueError, match="tiktoken gpt2"):
        checkpoint.check_tokenizer_matches({}, {"tokenizer": char}, tmp_path / "meta.json")


def test_config_json_gives_the_tokenizers_own_end_of_text_id(tmp_path: Path) -> None:
    char_ckpt = save(tmp_path / "char", tiny_model(0), 10)  # a 65-symbol char vocabulary: no end-of-text token
    config = json.loads((char_ckpt / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # not GPT-2's 50256, outside 65 tokens
    bpe = gpt2_bpe()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304))
    bpe_ckpt = save_checkpoint(tmp_path / "bpe", model, {"tokenizer": bpe.to_meta()}, {}, iter_num=1, is_best=False)
    config = json.loads((bpe_ckpt / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == bpe.eot_token == 50256
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoConfig.from_pretrained(char_ckpt).eos_token_id is None
