"""Pixels and faces, plain functions on arrays: decoding and encoding every image format we accept (``decode.py``),
MTCNN detection (``mtcnn.py``), FFHQ alignment and paste-back (``faces.py``), the quality measures of a restored face
(``quality.py``) and the degradation estimate of an aligned one (``degradation.py``). No Ray, no storage."""
