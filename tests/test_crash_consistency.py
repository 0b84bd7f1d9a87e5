"""A save killed at any file-system step leaves the old adapter or the new one, never a mix;
concurrent savers and readers of one directory never see each other's half-done work.

The kill test forks a child per step ``k``: an audit hook (``sys.addaudithook``) counts the
child's file-system operations under the directory and SIGKILLs the child just before the
``k``-th, for every ``k`` of a full save. (Audit events fire before the operation runs.)
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading

import pytest
import torch

from peft_kernel import PeftModel, get_peft_model, io
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoraConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and flock (POSIX)")

#: audit events that change the file system
MUTATING = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.link",
            "os.symlink", "os.chmod"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
#: the longer saves are killed at every third step here, at every step under tox -e fuzz
SUBSAMPLE = 1 if os.environ.get("PEFT_KERNEL_FUZZ") == "1" else 3


MLP = functools.partial(tiny_models.MLP, (6, 8, 3))


def base():
    torch.manual_seed(0)
    return MLP()


def adapter(seed: int, alpha: int, names=("default",)):
    """A model whose adapters all differ from those of another seed / alpha."""
    model = None
    for name in names:
        config = LoraConfig(target_modules=["lin0", "lin1"], lora_alpha=alpha, init_lora_weights=False)
        if model is None:
            model = get_peft_model(base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def output(directory) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(base(), str(directory)).eval()(X)


def _mutates(event: str, args: tuple, root: str) -> bool:
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
        return bool(writes) and isinstance(path, str) and path.startswith(root)
    return event in MUTATING and bool(args) and isinstance(args[0], str) and args[0].startswith(root)


def run_killed(action, root, kill_at: int | None) -> int | None:
    """Run ``action()`` in a forked child that SIGKILLs itself before its ``kill_at``-th
    file-system change under ``root``. Returns the number of changes of a full run."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        status = 1
        try:
            count = [0]
            prefix = os.path.realpath(root)

            def hook(event, args):
                if _mutates(event, args, prefix) or _mutates(event, args, str(root)):
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count[0] += 1

            sys.addaudithook(hook)
            action()
            os.write(write, str(count[0]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as fh:
        reported = fh.read()
    _, status = os.waitpid(pid, 0)
    if kill_at is None:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the save failed in the child"
        return int(reported)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
    return None


def kill_at_every_step(root, make_old, save_new, check, stride: int = 1) -> list[str]:
    """``check()`` after the new save was killed before its ``k``-th file-system change under
    ``root``, for every ``k`` of a full save (every ``stride``-th, and the last) and once
    unkilled; returns what each returned."""
    make_old()
    steps = run_killed(save_new, root, None)
    assert steps > 3
    seen = []
    for k in [*range(0, steps - 1, stride), steps - 1, None]:
        make_old()
        run_killed(save_new, root, k)
        seen.append(check())
    return seen


def assert_switches_once(seen: list[str]) -> None:
    """Old for every kill before the commit point, new for every kill after it."""
    assert seen[0] == "old" and seen[-1] == "new", seen
    first_new = seen.index("new")
    assert set(seen[:first_new]) == {"old"} and set(seen[first_new:]) == {"new"}, seen


def _outcome(got: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> str:
    if torch.equal(got, old):
        return "old"
    assert torch.equal(got, new), "the directory loaded as neither the old nor the new adapter"
    return "new"


def _reset(directory, fill) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    fill()


def test_save_killed_at_every_step_loads_old_or_new(tmp_path):
    """Over an existing adapter of other weights and another lora_alpha (16 vs 512): the
    mixed state of the audit (new weights, old config) must never load."""
    directory = tmp_path / "adapter"
    old_model, new_model = adapter(0, 16), adapter(1, 512)
    old_out, new_out = old_model(X).detach(), new_model(X).detach()
    references = {}
    for label, model in (("old", old_model), ("new", new_model)):
        model.save_pretrained(tmp_path / "references" / label)
        references[label] = _plain_files(tmp_path / "references" / label)

    def make_old():
        _reset(directory, lambda: old_model.save_pretrained(directory))

    def check():
        plain = _plain_files(directory)  # what HF PEFT reads: the usual names, no journal
        assert "adapter_config.json" not in plain or plain in references.values(), "a reader sees a mix"
        return _outcome(output(directory), old_out, new_out)

    seen = kill_at_every_step(str(tmp_path / "adapter"), make_old, lambda: new_model.save_pretrained(directory),
                              check)
    assert_switches_once(seen)
    # the next save completes or clears what a killed one left
    make_old()
    run_killed(lambda: new_model.save_pretrained(directory), str(directory), 6)
    old_model.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(output(directory), old_out)


def _plain_files(directory) -> dict[str, bytes]:
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    return {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}


def test_multi_adapter_save_with_format_switch_killed_at_every_step(tmp_path):
    """Two adapters (``default`` at the top, ``other`` in a subfolder), old ones pickled
    (.bin), new ones safetensors: each directory is old or new at every step, and a stale
    weights file of the other format never outlives the save that replaced it."""
    directory = tmp_path / "adapters"
    names = ("default", "other")
    old_model, new_model = adapter(2, 16, names), adapter(3, 512, names)
    outs = {}
    for label, model in (("old", old_model), ("new", new_model)):
        for name in names:
            model.set_adapter(name)
            outs[label, name] = model(X).detach()

    def make_old():
        _reset(directory, lambda: old_model.save_pretrained(directory, safe_serialization=False))

    def check():
        result = []
        for name in names:
            path = directory if name == "default" else directory / name
            result.append(_outcome(output(path), outs["old", name], outs["new", name]))
            files = set(os.listdir(path))
            assert not {"adapter_model.bin", "adapter_model.safetensors"} <= files or io.JOURNAL_NAME in files
        return result

    seen = kill_at_every_step(str(tmp_path), make_old, lambda: new_model.save_pretrained(directory), check,
                              stride=SUBSAMPLE)
    for position in range(len(names)):
        assert_switches_once([s[position] for s in seen])


def _committed_view(directory) -> dict[str, str] | None:
    """The directory's files as the kernel's readers see them (journal applied)."""
    names = {e for e in os.listdir(directory) if not io.is_staging_debris(e) and e != io.JOURNAL_NAME}
    journal = directory / io.JOURNAL_NAME
    if journal.exists():
        names |= set(json.loads(journal.read_text())["files"])
    view = {}
    for name in names:
        path = io.committed_path(str(directory), name)
        if path is not None and os.path.isfile(path):
            with open(path) as fh:
                view[name] = fh.read()
    return view


def test_cli_output_replacement_killed_at_every_step(tmp_path):
    """``merge`` / ``finetune`` replace their whole --output: at every step it exists and holds
    the old files or the new ones (readers that ignore the journal may find no config)."""
    from peft_kernel.cli._common import staged_output

    out = tmp_path / "out"
    old = {"config.json": "old config", "model.safetensors": "old weights", "notes.txt": "old only"}
    new = {"config.json": "new config", "model.safetensors": "new weights", "tokenizer.json": "new only"}

    def write(files, directory):
        for name, text in files.items():
            (directory / name).write_text(text)

    def make_old():
        _reset(out, lambda: (out.mkdir(), write(old, out)))

    def save_new():
        with staged_output(str(out)) as tmp:
            write(new, tmp_path / tmp)

    def check():
        assert out.is_dir()
        view = _committed_view(out)
        plain = {e: (out / e).read_text() for e in os.listdir(out) if (out / e).is_file() and e in old.keys() | new}
        assert "config.json" not in plain or plain in (old, new), plain
        assert view in (old, new), view
        return "old" if view == old else "new"

    assert_switches_once(kill_at_every_step(str(tmp_path), make_old, save_new, check))


def test_concurrent_savers_and_readers_never_mix(tmp_path):
    """Two processes save different adapters into one directory while a third loads it:
    every load is one of the two, and so is the directory at the end."""
    directory = tmp_path / "adapter"
    models = [adapter(4, 16), adapter(5, 512)]
    outs = [m(X).detach() for m in models]
    models[0].save_pretrained(directory)

    def saver(model):
        def run():
            for _ in range(8):
                model.save_pretrained(directory)
        return run

    pids = []
    for model in models:
        pid = os.fork()
        if pid == 0:
            try:
                saver(model)()
            finally:
                os._exit(0)
        pids.append(pid)
    try:
        for _ in range(12):
            got = output(directory)
            assert torch.equal(got, outs[0]) or torch.equal(got, outs[1])
    finally:
        for pid in pids:
            os.waitpid(pid, 0)
    got = output(directory)
    assert torch.equal(got, outs[0]) or torch.equal(got, outs[1])
    assert not any(io.is_staging_debris(e) for e in os.listdir(directory))


def test_threads_saving_one_directory_take_turns(tmp_path):
    directory = tmp_path / "adapter"
    models = [adapter(6, 16), adapter(7, 512)]
    outs = [m(X).detach() for m in models]
    errors = []

    def run(model):
        try:
            for _ in range(4):
                model.save_pretrained(directory)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = output(directory)
    assert torch.equal(got, outs[0]) or torch.equal(got, outs[1])


def test_crafted_journal_cannot_reach_outside_the_directory(tmp_path):
    """A downloaded directory may carry any journal: names that leave it are refused."""
    directory = tmp_path / "adapter"
    adapter(0, 16).save_pretrained(directory)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    for journal in ({"format": 1, "stage": "../", "files": ["secret.txt"], "remove": []},
                    {"format": 1, "stage": ".peft-stage-x", "files": ["../secret.txt"], "remove": []},
                    {"format": 1, "stage": ".peft-stage-x", "files": [], "remove": ["/etc"]},
                    ["not", "a", "journal"]):
        (directory / io.JOURNAL_NAME).write_text(json.dumps(journal))
        with pytest.raises(ValueError, match="journal"):
            output(directory)
        with pytest.raises(ValueError, match="journal"):
            adapter(1, 16).save_pretrained(directory)
    assert secret.read_text() == "not yours"
    (directory / io.JOURNAL_NAME).unlink()
    assert output(directory).shape == (5, 3)
