"""A PyTorch reference of DCP-CLIP, built from an export directory alone (python -m dcp_jax.export).

    from dcp_jax.torch_ref import load_reference
    ref = load_reference("exports/b16")            # transformers CLIPModel + the head in torch.nn
    features = ref.encode(images)                  # [B,S,S,3] RGB 0..255
    logits = ref.decode(features, T, slot_class, slot_valid, guidance_text)   # == DCPCLIP.decode
    out = ref(images, T, seen=seen)                # encode + DCS + head + tag validation

head.py holds the head (one torch module per flax module, same parameter names), model.py the CLIP
features, DCS, tag validation and loading, timing.py `forward_call` / `time_forward`, verify.py `verify_export`
(the JAX-vs-torch check behind `--verify`; the only part that imports JAX, so import it as
`dcp_jax.torch_ref.verify` where JAX is wanted). torch is imported
nowhere else in dcp_jax. Needs the `torch` extra: pip install 'dcp_jax[torch]'.
"""

from dcp_jax.torch_ref.model import ExportMismatchError, TorchDCP, load_config, load_reference
from dcp_jax.torch_ref.timing import forward_call, time_forward

__all__ = ["ExportMismatchError", "TorchDCP", "forward_call", "load_config", "load_reference", "time_forward"]
