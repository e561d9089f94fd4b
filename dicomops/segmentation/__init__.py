"""Nodule localisation: a MONAI 3D U-Net trained on 1 mm patches, judged per nodule (Dice, FROC, kappa)."""
