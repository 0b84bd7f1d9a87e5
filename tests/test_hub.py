"""Adapters from the Hugging Face Hub, without the network: ``PeftModel.from_pretrained(model,
"user/repo", revision=..., subfolder=..., token=...)`` through huggingface_hub from a cache that the
test fills, offline mode and ``local_files_only``, and ``push_to_hub`` to a stand-in Hub on
127.0.0.1 (a few endpoints, bounded, stopped at the end of the test) that the adapter is then
downloaded back from. Also the model card an adapter is saved with."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from peft_kernel import PeftConfig, PeftModel, get_peft_model
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoraConfig

TOKEN = "hf_stand_in_token"


TinyNet = functools.partial(tiny_models.MLP, (6, 8, 4))


def base() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def trained(seed: int) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(base(), LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False))


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def fill_cache(cache, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> None:
    """Lay files out the way huggingface_hub caches them (blobs, a snapshot, refs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def saved_files(model, tmp_path, name) -> dict[str, bytes]:
    model.save_pretrained(tmp_path / name)
    return {p: (tmp_path / name / p).read_bytes() for p in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture
def hub_cache(tmp_path):
    """A cache holding user/adapter at main (seed 1) and, on branch v1, another adapter (seed 2)
    in the subfolder "sub"."""
    cache = tmp_path / "cache"
    fill_cache(cache, "user/adapter", "a" * 40, saved_files(trained(1), tmp_path, "one"), refs=("main",))
    second = {f"sub/{k}": v for k, v in saved_files(trained(2), tmp_path, "two").items()}
    fill_cache(cache, "user/adapter", "b" * 40, second, refs=("v1",))
    return cache


def test_load_from_the_cache_by_repo_id(hub_cache):
    loaded = PeftModel.from_pretrained(base(), "user/adapter", cache_dir=str(hub_cache), local_files_only=True)
    torch.testing.assert_close(outputs(loaded), outputs(trained(1)))
    other = PeftModel.from_pretrained(base(), "user/adapter", revision="v1", subfolder="sub", token=TOKEN,
                                      cache_dir=str(hub_cache), local_files_only=True)
    torch.testing.assert_close(outputs(other), outputs(trained(2)))
    loaded.load_adapter("user/adapter", "second", revision="v1", subfolder="sub", cache_dir=str(hub_cache),
                        local_files_only=True)
    loaded.set_adapter("second")
    torch.testing.assert_close(outputs(loaded), outputs(trained(2)))


def test_offline_mode_uses_the_cache_and_says_what_is_missing(hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = PeftModel.from_pretrained(base(), "user/adapter", cache_dir=str(hub_cache))
    torch.testing.assert_close(outputs(loaded), outputs(trained(1)))
    with pytest.raises(ValueError, match=r"user/missing.*HF_HUB_OFFLINE=1 or local_files_only=True"):
        PeftModel.from_pretrained(base(), "user/missing", cache_dir=str(hub_cache))
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hugging Face Hub repo id"):
        PeftConfig.from_pretrained("./no/such/dir/..", cache_dir=str(hub_cache))


class StandInHub(BaseHTTPRequestHandler):
    """The few Hub endpoints that create_repo, upload_folder and hf_hub_download call, on an
    in-memory store; every request must carry the test token."""

    repos: dict[str, dict[str, bytes]]
    commit = "c" * 40

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data) -> None:
        self._reply(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._reply(401, b'{"error": "token"}', {"X-Error-Code": "Unauthorized"})
        return False

    def do_POST(self) -> None:
        if not self._authorised():
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.repos.setdefault(repo_id, {})
            self._json({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        elif parts[:2] == ["api", "validate-yaml"]:  # the card's metadata, checked before the upload
            content = json.loads(body)["content"]
            valid = content.startswith("---\n") and isinstance(yaml.safe_load(content.split("---\n")[1]), dict)
            self._json({"warnings": [], "errors": [] if valid else [{"message": "bad YAML"}]})
        elif parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = self.repos[f"{parts[2]}/{parts[3]}"]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self._json({"commitUrl": f"http://{self.headers['Host']}/{parts[2]}/{parts[3]}/commit/{self.commit}",
                        "commitOid": self.commit, "pullRequestUrl": None})
        else:
            self._reply(404)

    def do_GET(self) -> None:
        if not self._authorised():
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        repo_id, path = "/".join(parts[:2]), "/".join(parts[4:])
        data = self.repos.get(repo_id, {}).get(path) if parts[2:3] == ["resolve"] else None
        if data is None:
            self._reply(404, b"", {"X-Error-Code": "EntryNotFound" if repo_id in self.repos else "RepoNotFound"})
            return
        self._reply(200, data, {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

    do_HEAD = do_GET


@pytest.fixture
def stand_in_hub(monkeypatch):
    handler = type("Hub", (StandInHub,), {"repos": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        yield handler.repos
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_to_hub_then_load_by_repo_id(stand_in_hub, tmp_path):
    model = trained(3)
    model.push_to_hub("user/pushed", token=TOKEN, commit_message="first adapter")
    assert set(stand_in_hub["user/pushed"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = ModelCard(stand_in_hub["user/pushed"]["README.md"].decode())
    assert card.data.library_name == "peft"
    loaded = PeftModel.from_pretrained(base(), "user/pushed", token=TOKEN, cache_dir=str(tmp_path / "cache"))
    torch.testing.assert_close(outputs(loaded), outputs(model))
    with pytest.raises(OSError, match="401"):  # the token reaches the Hub: without it the stand-in refuses
        PeftModel.from_pretrained(base(), "user/pushed", token=False, cache_dir=str(tmp_path / "other"))


def test_model_card_like_hf_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    llama.config._name_or_path = llama.name_or_path = "org/tiny-llama"
    llama.add_model_tags(["my-tag"])
    model = get_peft_model(llama, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nNotes.\n")
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.license == "mit"  # the user's card is updated, not replaced
    assert card.data.pipeline_tag == "text-generation"
    assert set(card.data.tags) == {"mine", "my-tag", "lora", "transformers", "base_model:adapter:org/tiny-llama"}
    assert "# My adapter" in card.text and "- PEFT 0.21.2+peftkernel." in card.text
    model.save_pretrained(tmp_path)  # saving again adds nothing twice
    assert ModelCard.load(tmp_path / "README.md").text.count("- PEFT ") == 1
