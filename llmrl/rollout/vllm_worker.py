"""The vLLM worker extension that swaps new weights into a running engine.

vLLM mixes this class into its workers (`LLM(worker_extension_cls=...)`); the engine calls it
with `collective_rpc("llmrl_reload_weights", args=(path,))`. `reload_weights` (not the
model's `load_weights`) is what works on the CPU build, which repacks some weights at load.
This module must not import vLLM: the workers import it by name.
"""
from __future__ import annotations

from typing import Any



class WeightReloadExtension:
    def llmrl_reload_weights(self, path: str) -> int:
        """Load every tensor of the safetensors file at `path`; return how many were loaded."""
        from safetensors.torch import load_file

        weights = load_file(path)
        runner = self.model_runner  # type: ignore[attr-defined]
        runner.reload_weights(weights_iterator=iter(weights.items()))
        retie_output_embeddings(runner.get_model())
        return len(weights)


def retie_output_embeddings(model: Any) -> None:
    """The in-place reload skips a tied lm_head (its weights arrive as the input embedding), so
    the layer is never re-processed: on the CPU build it keeps computing with a GEMM handle
    packed from the old weights. Point it at the current embedding and let its quant method
    process it again (which repacks it on CPU)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is None:
        return
    head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
