"""Preprocessing: HU volumes (``volume``), MONAI transforms (``transforms``), image features
(``features``), 2.5D slabs (``slabs``) and the cached, parallel stage (``stage``)."""
