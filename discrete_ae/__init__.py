"""The machinery of this repo, one idea a module; nothing here imports the root's files.

    geometry            the image and latent shapes, defined once
    errors              one-line errors and the `cli` wrapper every program leaves through
    overrides           --key=value options checked against the defaults' types
    device              devices, bf16 autocast, random generators
    files               atomic writes (JSON, JSONL, tensors)
    runs                what a run owns: its paths, its lock, its id
    process             torchrun processes and signals
    data                CIFAR-10, image folders, the epoch order and augmentation
    metrics             PSNR, SSIM, codebook use (pure functions)
    bottleneck          the interface every bottleneck returns (QuantizerOutput)
    library_quantizers  vector-quantize-pytorch's VQ, LFQ, FSP, SimVQ, residual FSQ; no bottleneck; VAE
    priors              rate priors: fitted histograms, learned and context priors
    coding              range coding of integers under a prior, and its tables
    codec_file          the whole-photo file format of codec.py
    bjontegaard         BD-rate and BD-PSNR
    optim               Muon + Adam, the learning-rate schedule
    plots               grids, curves, rate-distortion figures
"""
