"""Load a musiclora AudioLDM2 adapter onto a bare AudioLDM2 UNet with plain diffusers + peft (no musiclora
import) and show it changes the UNet's output.

    python examples/plain_audioldm2_load.py <audioldm2-base-folder> <adapter-url-or-folder>

The base folder is in the cvssp/audioldm2-music layout (the adapter targets its `unet/`, a diffusers
AudioLDM2UNet2DConditionModel). The adapter is a standard peft folder (adapter_config.json +
adapter_model.safetensors); the URL may be s3:// (endpoint and keys from the standard AWS_*
variables) or a folder. Load: PeftModel.from_pretrained(unet, folder). To generate with it, put the
loaded UNet into diffusers' AudioLDM2Pipeline (`AudioLDM2Pipeline.from_pretrained(base, unet=...)`).

Prints one JSON line; exits 1 if the adapter leaves the output unchanged.
"""

import json
import os
import sys
import tempfile

import s3fs
import torch
from diffusers import AudioLDM2UNet2DConditionModel
from peft import PeftModel


def fetch(url: str) -> str:
    if not url.startswith("s3://"):
        return url
    fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    local = tempfile.mkdtemp()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        fs.get(f"{url[5:].rstrip('/')}/{name}", os.path.join(local, name))
    return local


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction for fixed noisy latents, timestep, GPT-2-sized and T5-sized states."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    dims = cfg.cross_attention_dim[0] if isinstance(cfg.cross_attention_dim[0], (list, tuple)) else cfg.cross_attention_dim
    gpt_dim, t5_dim = [d for d in dims if d is not None][:2]
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    generated, t5 = torch.randn(1, 8, gpt_dim, generator=g), torch.randn(1, 5, t5_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=generated, encoder_hidden_states_1=t5,
                    encoder_attention_mask_1=torch.ones(1, 5, dtype=torch.long)).sample


def main(base: str, adapter: str) -> int:
    folder = fetch(adapter)
    before = unet_output(AudioLDM2UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval())
    unet = PeftModel.from_pretrained(AudioLDM2UNet2DConditionModel.from_pretrained(base, subfolder="unet"), folder)
    after = unet_output(unet.eval())
    change = (after - before).abs().max().item()
    n_lora = sum(1 for n, _ in unet.named_parameters() if "lora_" in n)
    print(json.dumps({"plain_peft_load": "ok", "lora_tensors": n_lora, "max_output_change": change}))
    return 0 if change > 0 and n_lora > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
