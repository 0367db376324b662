"""Networks: the 3D U-Net of Çiçek et al. (2016) and the V-Net of Milletari et al. (2016)."""
