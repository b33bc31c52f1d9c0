"""Load a musiclora AudioLDM adapter onto a bare UNet with plain diffusers and plain peft (no musiclora
import) and show both change the UNet's output the same way.

    python examples/plain_audioldm_load.py <audioldm-base-folder> <adapter-url-or-folder>

The base folder is in the cvssp/audioldm-s-full-v2 layout (the adapter targets its `unet/`). The
adapter is a standard peft folder (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight`); the URL may be s3:// (endpoint and keys from the
standard AWS_* variables) or a folder. Two ways to load it:

- peft:      PeftModel.from_pretrained(unet, folder)
- diffusers: unet.load_lora_adapter(state_dict_without_the_peft_prefix, prefix=None,
                                    metadata={r, lora_alpha, target_modules from adapter_config.json})
  (without `metadata` diffusers would infer lora_alpha = r and scale the update wrongly).

Prints one JSON line; exits 1 if the adapter leaves the output unchanged or the two loads disagree.
"""

import json
import os
import sys
import tempfile

import s3fs
import torch
from diffusers import UNet2DConditionModel
from peft import PeftModel
from safetensors.torch import load_file


def fetch(url: str) -> str:
    if not url.startswith("s3://"):
        return url
    fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    local = tempfile.mkdtemp()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        fs.get(f"{url[5:].rstrip('/')}/{name}", os.path.join(local, name))
    return local


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction for fixed noisy latents, timestep and CLAP-sized class embedding."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, 32, 16, generator=g)
    label = torch.nn.functional.normalize(torch.randn(1, cfg.projection_class_embeddings_input_dim, generator=g), dim=-1)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=None, class_labels=label).sample


def main(base: str, adapter: str) -> int:
    folder = fetch(adapter)
    before = unet_output(UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval())

    peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), folder).eval()
    via_peft = unet_output(peft_unet)

    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    unet.load_lora_adapter(state, prefix=None, metadata={k: config[k] for k in ("r", "lora_alpha", "target_modules")})
    via_diffusers = unet_output(unet)

    change = (via_peft - before).abs().max().item()
    disagreement = (via_diffusers - via_peft).abs().max().item()
    n_lora = sum(1 for n, _ in peft_unet.named_parameters() if "lora_" in n)
    print(json.dumps({"plain_peft_load": "ok", "plain_diffusers_load": "ok", "lora_tensors": n_lora,
                      "max_output_change": change, "peft_vs_diffusers_max_diff": disagreement}))
    return 0 if change > 0 and disagreement <= 1e-5 * max(1.0, change) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
