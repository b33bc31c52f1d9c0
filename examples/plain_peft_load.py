"""Load a musiclora adapter with plain transformers + peft (no musiclora import) and show it changes outputs.

    python examples/plain_peft_load.py <tiny-base-folder> <adapter-url-or-folder>

The adapter URL may be s3:// (endpoint and keys from the standard AWS_* variables) or a folder.
Prints one JSON line; exits 1 if the adapter leaves the logits unchanged.
"""

import json
import os
import sys
import tempfile

import s3fs
import torch
from peft import PeftModel
from transformers import AutoTokenizer, MusicgenMelodyForConditionalGeneration


def fetch(url: str) -> str:
    if not url.startswith("s3://"):
        return url
    fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    local = tempfile.mkdtemp()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        fs.get(f"{url[5:].rstrip('/')}/{name}", os.path.join(local, name))
    return local


def main(base: str, adapter: str) -> int:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = MusicgenMelodyForConditionalGeneration.from_pretrained(base).eval()
    text = tokenizer(["orchestral battle music"], return_tensors="pt")
    k = model.decoder.num_codebooks
    decoder_input_ids = torch.full((k, 8), model.generation_config.pad_token_id, dtype=torch.long)
    with torch.no_grad():
        before = model(**text, decoder_input_ids=decoder_input_ids).logits
        peft_model = PeftModel.from_pretrained(model, fetch(adapter)).eval()
        after = peft_model(**text, decoder_input_ids=decoder_input_ids).logits
    diff = (after - before).abs().max().item()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    print(json.dumps({"plain_peft_load": "ok", "lora_tensors": n_lora, "max_logit_change": diff}))
    return 0 if diff > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
