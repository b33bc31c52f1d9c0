"""Load a musiclora Stable Audio Open adapter onto a bare StableAudioDiTModel with plain diffusers + peft
(no musiclora import) and show it changes the DiT's output.

    python examples/plain_stable_audio_load.py <stable-audio-open-base-folder> <adapter-url-or-folder>

The base folder is in the stabilityai/stable-audio-open-1.0 layout (the adapter targets its
`transformer/`). The adapter is a standard peft folder (adapter_config.json +
adapter_model.safetensors); the URL may be s3:// (endpoint and keys from the standard AWS_*
variables) or a folder. Load: PeftModel.from_pretrained(transformer, folder); to generate with it,
pass the loaded transformer to diffusers' StableAudioPipeline (`transformer=...`).

Prints one JSON line; exits 1 if the adapter leaves the output unchanged.
"""

import json
import os
import sys
import tempfile

import s3fs
import torch
from diffusers import StableAudioDiTModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from peft import PeftModel


def fetch(url: str) -> str:
    if not url.startswith("s3://"):
        return url
    fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    local = tempfile.mkdtemp()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        fs.get(f"{url[5:].rstrip('/')}/{name}", os.path.join(local, name))
    return local


def dit_output(dit, seed: int = 0) -> torch.Tensor:
    """The DiT's v prediction for fixed noisy latents, time, cross-attention and global inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = dit.config
    sample = torch.randn(1, cfg.in_channels, 16, generator=g)
    cross = torch.randn(1, 6, cfg.cross_attention_input_dim, generator=g)
    glob = torch.randn(1, 1, cfg.global_states_input_dim, generator=g)
    rotary = get_1d_rotary_pos_embed(cfg.attention_head_dim // 2, 17, use_real=True, repeat_interleave_real=False)
    with torch.no_grad():
        return dit(sample, torch.tensor([0.5]), encoder_hidden_states=cross, global_hidden_states=glob,
                   rotary_embedding=rotary).sample


def main(base: str, adapter: str) -> int:
    folder = fetch(adapter)
    before = dit_output(StableAudioDiTModel.from_pretrained(base, subfolder="transformer").eval())
    dit = PeftModel.from_pretrained(StableAudioDiTModel.from_pretrained(base, subfolder="transformer"), folder)
    after = dit_output(dit.eval())
    change = (after - before).abs().max().item()
    n_lora = sum(1 for n, _ in dit.named_parameters() if "lora_" in n)
    print(json.dumps({"plain_peft_load": "ok", "lora_tensors": n_lora, "max_output_change": change}))
    return 0 if change > 0 and n_lora > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
