"""Fit the tiny preset's EnCodec to real audio, so its codes and its decoded audio mean something.

The `tiny` MusicGen-Melody preset is built from configs with random weights. transformers
initialises `EncodecEuclideanCodebook.embed` to zeros (every frame quantises to code 0); the
preset draws random codebooks instead, but at a scale unrelated to the random encoder's
latents, so few entries are ever used and the random decoder maps codes to noise. EnCodec
itself initialises its codebooks by k-means on the first training batch (audiocraft
`quantization/core_vq.py`, `EuclideanCodebook.init_embed_` with `kmeans_init=True`);
`fit_codebooks` does that, level by level of the residual quantiser. Before it, `data_init`
gives encoder and decoder a data-dependent initialisation (their default one lets the input's
share of the signal vanish, so the decoder's output ignores the codes). `fit_decoder` then trains
the decoder alone to turn the quantised latents back into the audio (multi-resolution log-mel
L1 + waveform L1, the reconstruction part of EnCodec's loss, without its adversarial terms), so
generated codes decode to something with the spectral outline of the training audio.

Both only make sense for the tiny preset; a pretrained codec is left alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MEL_FFTS = (512, 1024, 2048)


def codebooks_degenerate(codec: nn.Module) -> bool:
    """True if some residual-quantiser level has all its codebook entries equal (e.g. all zeros)."""
    for layer in codec.quantizer.layers:
        embed = layer.codebook.embed
        if torch.all(embed == embed[:1]):
            return True
    return False


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with random-sample initialisation; empty clusters are re-seeded from the data.

    Args:
        x: float32 points, shape [N, D], N >= k.
        k: number of centroids.
        iters: Lloyd iterations.
        seed: RNG seed for the initial and re-seeded centroids.

    Returns:
        float32 centroids, shape [k, D].

    Raises:
        ValueError: if N < k.
    """
    if x.shape[0] < k:
        raise ValueError(f"kmeans: {x.shape[0]} points for {k} centroids")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = int((~filled).sum())
        if empty:
            centroids[~filled] = x[torch.randint(0, x.shape[0], (empty,), generator=gen)]
    return centroids


@torch.no_grad()
def _latents(codec: nn.Module, wavs: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Encoder latents of float32 clips [N, L] -> [N, D, T]."""
    return torch.cat([codec.encoder(wavs[i : i + batch, None]) for i in range(0, wavs.shape[0], batch)])


def _weight_normed(module: nn.Module) -> list[nn.Module]:
    """The weight-normed convolutions inside `module`, in definition (= forward) order."""
    return [
        m
        for m in module.modules()
        if hasattr(m, "parametrizations") and hasattr(m.parametrizations, "weight")
    ]


@torch.no_grad()
def data_init(stack: nn.Module, inputs: torch.Tensor, out_std: float = 1.0) -> list[float]:
    """Data-dependent initialisation of a weight-normed conv stack (Salimans & Kingma 2016, sec. 3).

    Built from configs, the tiny codec's encoder and decoder have PyTorch's default
    initialisation, whose gain is below 1: over 15 layers the input's share of the signal
    vanishes and the biases decide the output (the decoder's output barely depends on its input).
    Here, layer by layer in forward order, the weight-norm gain g and the bias are rescaled so
    that the layer's output on `inputs` has zero mean per channel and unit standard deviation
    (the last one `out_std`): b <- (b - mean_c) / s, g <- g / s, s the output's std.

    Args:
        stack: the encoder or decoder (a transformers `EncodecEncoder` / `EncodecDecoder`).
        inputs: a batch it takes (audio [N, 1, L] for the encoder, latents [N, D, T] for the decoder).
        out_std: wanted std of the last layer's output (e.g. the audio's std for the decoder).

    Returns:
        The output std of each layer before its rescaling.
    """
    convs, before = _weight_normed(stack), []
    for i, conv in enumerate(convs):
        seen = {}
        handle = conv.register_forward_hook(lambda _m, _i, out, seen=seen: seen.setdefault("out", out))
        stack(inputs)
        handle.remove()
        out = seen["out"]
        mean, std = out.mean(dim=(0, 2)), float(out.std().clamp_min(1e-8))
        target = out_std if i == len(convs) - 1 else 1.0
        conv.parametrizations.weight.original0.mul_(target / std)
        if conv.bias is not None:
            conv.bias.copy_((conv.bias - mean) * (target / std))
        before.append(std)
    return before


@torch.no_grad()
@torch.no_grad()
def fit_codebooks(
    codec: nn.Module, wavs: torch.Tensor, entries: int = 256, iters: int = 20, seed: int = 0
) -> dict:
    """Set each residual-quantiser level's codebook by k-means on the residual latents of `wavs`.

    Level q is fitted on what levels < q leave unexplained. Only `entries` distinct centroids
    are fitted per level (a few minutes of audio cannot place 2048); the rest of the codebook
    repeats them, and since quantisation takes the first of equal distances, the repeats are
    never chosen.

    Args:
        codec: a transformers `EncodecModel` (its quantiser is overwritten in place).
        wavs: float32 mono clips at the codec's rate, shape [N, L].
        entries: distinct centroids per level, <= the codebook size.
        iters: k-means iterations.
        seed: k-means seed.

    Returns:
        {"frames": latent frames used, "entries": entries, "relative_residual": [per level
        mean ||residual|| / mean ||latent|| after that level]}.

    Raises:
        ValueError: `entries` exceeds the codebook size or the number of latent frames.
    """
    return fit_codebooks_to_latents(codec, _latents(codec, wavs), entries, iters, seed)


@torch.no_grad()
def fit_codebooks_to_latents(
    codec: nn.Module, z: torch.Tensor, entries: int = 256, iters: int = 20, seed: int = 0
) -> dict:
    """`fit_codebooks` on given latents z, float32 [N, D, T] (D = the codebook dimension)."""
    points = z.permute(0, 2, 1).reshape(-1, z.shape[1]).float()
    size = codec.quantizer.layers[0].codebook.embed.shape[0]
    if not 0 < entries <= size:
        raise ValueError(f"entries must be in [1, {size}], got {entries}")
    residual, scale, ratios = points.clone(), float(points.norm(dim=1).mean()), []
    for q, layer in enumerate(codec.quantizer.layers):
        centroids = kmeans(residual, entries, iters, seed + q)
        full = centroids[torch.arange(size) % entries]
        cb = layer.codebook
        cb.embed.copy_(full)
        cb.embed_avg.copy_(full)
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1.0)
        residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=1)]
        ratios.append(float(residual.norm(dim=1).mean()) / max(scale, 1e-12))
    return {"frames": int(points.shape[0]), "entries": entries, "relative_residual": ratios}


class MelLoss(nn.Module):
    """Multi-resolution log-mel L1 (FFT sizes `MEL_FFTS`, hop n_fft / 4, 64 mel bands), mean over resolutions."""

    def __init__(self, sample_rate: int, n_mels: int = 64):
        super().__init__()
        import librosa

        for n_fft in MEL_FFTS:
            bank = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
            self.register_buffer(f"mel_{n_fft}", torch.from_numpy(bank).float())
            self.register_buffer(f"win_{n_fft}", torch.hann_window(n_fft))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: float32 [B, L] -> scalar loss (natural-log units)."""
        total = pred.new_zeros(())
        for n_fft in MEL_FFTS:
            bank, win = getattr(self, f"mel_{n_fft}"), getattr(self, f"win_{n_fft}")
            spec = [
                torch.stft(x, n_fft, n_fft // 4, window=win, return_complex=True).abs().pow(2)
                for x in (pred, target)
            ]
            total = total + (torch.log(bank @ spec[0] + 1e-5) - torch.log(bank @ spec[1] + 1e-5)).abs().mean()
        return total / len(MEL_FFTS)


def fit_decoder(
    codec: nn.Module,
    wavs: torch.Tensor,
    steps: int = 200,
    batch_size: int = 8,
    crop_s: float = 1.0,
    lr: float = 3e-3,
    seed: int = 0,
    codes: torch.Tensor | None = None,
) -> list[float]:
    """Train the codec's decoder to reconstruct `wavs` from their quantised latents; the encoder stays fixed.

    Args:
        codec: a transformers `EncodecModel` with fitted codebooks (decoder weights updated in place).
        wavs: float32 mono clips at the codec's rate, shape [N, L], L >= crop_s * rate.
        steps: Adam steps.
        batch_size: random crops per step.
        crop_s: crop length in seconds (a multiple of the codec hop is used).
        lr: Adam learning rate.
        seed: seed of the crop sampler.
        codes: int64 codes of `wavs`, [N, K, T]; None: the codec's own encoding of `wavs`.

    Returns:
        The loss per step (multi-resolution log-mel L1 + waveform L1).
    """
    rate = int(codec.config.sampling_rate)
    hop = int(np.prod(codec.config.upsampling_ratios))
    crop = max(hop, int(crop_s * rate) // hop * hop)
    with torch.no_grad():
        if codes is None:
            codes = torch.cat(
                [codec.encode(wavs[i : i + 16, None]).audio_codes[0] for i in range(0, wavs.shape[0], 16)]
            )
        quantized = codec.quantizer.decode(codes.transpose(0, 1))  # [N, D, T]
    loss_fn = MelLoss(rate)
    for p in codec.parameters():
        p.requires_grad_(False)
    params = list(codec.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    frames, losses = crop // hop, []
    codec.decoder.train()
    for _ in range(steps):
        idx = torch.randint(0, wavs.shape[0], (batch_size,), generator=gen)
        start = torch.randint(0, quantized.shape[-1] - frames + 1, (1,), generator=gen).item()
        target = wavs[idx, start * hop : start * hop + crop]
        pred = codec.decoder(quantized[idx, :, start : start + frames])[:, 0, : target.shape[-1]]
        loss = loss_fn(pred, target) + (pred - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    codec.eval()
    return losses


class MelFrames:
    """Log-mel frames projected on their principal components: the study's stand-in for a trained encoder.

    A random EnCodec encoder is no feature extractor: its latents are white from one 20 ms frame to
    the next (lag-1 autocorrelation about 0.1 on the corpus), so their codes hold no music for a
    language model to learn. A trained EnCodec's latents change slowly, with the sound. These
    frames do: one log-mel spectrum per codec frame (hop = the codec's hop, 50 Hz), centred, projected
    on its first D principal components (fitted on training audio) and scaled by one global factor
    so that a frame's mean norm is sqrt(D). The codec's quantiser and decoder work on them unchanged.

    Args:
        sample_rate: Hz of the clips (the codec's rate).
        hop: samples per codec frame.
        dim: D, the codebook dimension.
        n_mels / n_fft: mel bands and FFT size of the log-mel.
    """

    def __init__(self, sample_rate: int, hop: int, dim: int, n_mels: int = 64, n_fft: int = 2048):
        import librosa

        self.sample_rate, self.hop, self.dim, self.n_fft = sample_rate, hop, dim, n_fft
        self.mel = torch.from_numpy(librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)).float()
        self.window = torch.hann_window(n_fft)
        self.mean: torch.Tensor | None = None  # [F]
        self.basis: torch.Tensor | None = None  # [D, F], scaled

    @torch.no_grad()
    def log_mel(self, wavs: torch.Tensor) -> torch.Tensor:
        """float32 clips [N, L] -> log-mel [N, F, T], T = L // hop, frame t centred on sample t * hop + hop / 2."""
        frames = wavs.shape[-1] // self.hop
        x = torch.nn.functional.pad(wavs, (self.hop // 2, 0))
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, return_complex=True).abs().pow(2)
        return torch.log(self.mel @ spec[..., :frames] + 1e-5)

    @torch.no_grad()
    def fit(self, wavs: torch.Tensor) -> float:
        """Fit mean and principal components on clips [N, L]; returns the share of variance kept."""
        m = self.log_mel(wavs)
        flat = m.permute(0, 2, 1).reshape(-1, m.shape[1])
        self.mean = flat.mean(dim=0)
        _, s, vt = torch.linalg.svd(flat - self.mean, full_matrices=False)
        basis = vt[: self.dim]
        scale = float(((flat - self.mean) @ basis.T).norm(dim=1).mean()) / self.dim**0.5
        self.basis = basis / scale
        return float((s[: self.dim] ** 2).sum() / (s**2).sum())

    @torch.no_grad()
    def __call__(self, wavs: torch.Tensor) -> torch.Tensor:
        """float32 clips [N, L] -> latents [N, D, T]. Raises RuntimeError before `fit`."""
        if self.basis is None:
            raise RuntimeError("MelFrames: call fit() first")
        return torch.einsum("df,nft->ndt", self.basis, self.log_mel(wavs) - self.mean[None, :, None])


@torch.no_grad()
def mel_codes(codec: nn.Module, frames: MelFrames, wavs: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Codes of clips [N, L] through `frames` and the codec's quantiser: int64 [N, K, T]."""
    out = [
        codec.quantizer.encode(frames(wavs[i : i + batch])).transpose(0, 1)
        for i in range(0, len(wavs), batch)
    ]
    return torch.cat(out)


def fit_mel_codec(
    codec: nn.Module,
    wavs: torch.Tensor,
    entries: int = 256,
    decoder_steps: int = 100,
    seed: int = 0,
    init_clips: int = 8,
) -> tuple[MelFrames, dict]:
    """Codec for the study: `MelFrames` as the encoder, k-means codebooks on them, the decoder fitted.

    Args:
        codec: the tiny preset's transformers `EncodecModel` (codebooks and decoder changed in place;
            its own encoder is not used by the returned `MelFrames`).
        wavs: float32 mono training clips at the codec's rate, [N, L].
        entries: k-means centroids per quantiser level.
        decoder_steps: `fit_decoder` steps (batch 8, 0.5 s crops).
        seed: seed of k-means and of the crop sampler.
        init_clips: clips for the decoder's data-dependent init.

    Returns:
        (the fitted `MelFrames`, {"frames", "entries", "relative_residual", "variance_kept",
        "lag1_autocorrelation" (of the latents, pooled over dimensions), "decoder_loss_first",
        "decoder_loss_last"}).
    """
    rate = int(codec.config.sampling_rate)
    hop = int(np.prod(codec.config.upsampling_ratios))
    dim = int(codec.quantizer.layers[0].codebook.embed.shape[1])
    frames = MelFrames(rate, hop, dim)
    kept = frames.fit(wavs)
    z = frames(wavs)
    zc = z - z.mean(dim=(0, 2), keepdim=True)
    lag1 = float((zc[..., 1:] * zc[..., :-1]).mean() / zc.pow(2).mean())
    stats = fit_codebooks_to_latents(codec, z, entries=entries, seed=seed)
    codes = mel_codes(codec, frames, wavs)
    with torch.no_grad():
        latents = codec.quantizer.decode(codes[:init_clips].transpose(0, 1))
    data_init(codec.decoder, latents, out_std=float(wavs.std()))
    curve = fit_decoder(codec, wavs, steps=decoder_steps, crop_s=0.5, seed=seed, codes=codes)
    stats.update(
        variance_kept=kept,
        lag1_autocorrelation=lag1,
        decoder_loss_first=float(np.mean(curve[:10])),
        decoder_loss_last=float(np.mean(curve[-10:])),
    )
    return frames, stats
