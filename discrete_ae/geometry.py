"""The shapes every module agrees on, defined once.

    image  (3, IMAGE_SIZE, IMAGE_SIZE) floats in [0, 1]: what the model takes and gives back, and
           the block a whole photo is cut into (codec.py)
    latent (C, *LATENT_HW): three stride-2 stages of the encoder, 32 -> 16 -> 8 -> 4
"""
IMAGE_SIZE = 32
IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
PIXELS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE  # bpp = bits per image / PIXELS_PER_IMAGE
DOWNSAMPLING = 8  # 2 ** (the encoder's stride-2 stages)
LATENT_HW = (IMAGE_SIZE // DOWNSAMPLING, IMAGE_SIZE // DOWNSAMPLING)
LATENT_POSITIONS = LATENT_HW[0] * LATENT_HW[1]  # integers per latent channel and image
