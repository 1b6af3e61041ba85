"""Math on one device: block-sparse attention layouts, Triton kernels with torch references, PowerSGD compute."""
