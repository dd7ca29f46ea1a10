"""Building blocks the models assemble, one small module each (each with its reference test):

- ``blur``: separable Gaussian blur;
- ``ssim``: structural similarity;
- ``halo_attention``: 2-D halo attention (HaloAE);
- ``transformer``: encoder / decoder layers and a 2-D positional embedding (HVQ-Trans);
- ``vector_quantizer``: per-class EMA codebooks (HVQ-Trans);
- ``ot_score``: the prototype optimal-transport score (HVQ-Trans);
- ``gaussian``: PCA whitening and Gaussian likelihood (Transformaly).

Nothing is imported here, so that ``models.base`` can use a layer without an import cycle.
"""
