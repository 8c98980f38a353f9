"""dr2: the compute of DR2 (Wang et al., "DR2: Diffusion-based Robust Degradation Remover for Blind Face
Restoration", CVPR 2023) as a plain PyTorch library.

Pure compute on tensors: the UNet (ADM / guided-diffusion layout of the official ``DR2_FFHQ.pkl``),
the respaced diffusion schedule, the low-pass filter Phi_N, the batched DR2 sampler, the SPARNetHD
enhancer and weight import/loading. No Ray, no storage, no environment variables, no device picking:
callers pass devices, dtypes and local paths.
"""
