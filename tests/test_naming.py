"""Model naming: last path segment, model-file extension removed, tags appended."""

from __future__ import annotations

import pytest

from llproxy.core.registry import final_names, model_name


@pytest.mark.parametrize(
    ("upstream_id", "name"),
    [
        ("TheBloke/Mistral-7B-Instruct-v0.2-AWQ", "Mistral-7B-Instruct-v0.2-AWQ"),
        ("/models/llama-3-8b-instruct.Q4_K_M.gguf", "llama-3-8b-instruct.Q4_K_M"),
        ("qwen2.5-7b-instruct-q4_k_m.GGUF", "qwen2.5-7b-instruct-q4_k_m"),
        ("model.safetensors", "model"),
        ("/data/weights.bin", "weights"),
        ("phi.ggml", "phi"),
        ("net.pt", "net"),
        ("net.pth", "net"),
        ("net.onnx", "net"),
        ("Llama-3.2-1B.llamafile", "Llama-3.2-1B"),
        ("llama3:8b", "llama3:8b"),
        ("gpt-4o", "gpt-4o"),
        ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
        ("C:\\models\\mixtral.gguf", "mixtral"),
        ("org/model.v1.5", "model.v1.5"),
        ("models/dir/", "dir"),
        (".gguf", ".gguf"),
    ],
)
def test_model_name(upstream_id: str, name: str) -> None:
    assert model_name(upstream_id) == name


def test_final_names_with_and_without_tags() -> None:
    assert final_names("org/m.gguf", ("gpu0", "fast")) == ["m:gpu0", "m:fast"]
    assert final_names("org/m.gguf", ()) == ["m"]
