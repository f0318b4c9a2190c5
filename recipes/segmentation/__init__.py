"""Segmentation recipe: Fisher-guided fine-tuning of an ImageNet-pretrained Unet on procedurally rendered
thin-structure ("crack") images over real photographs, with zero-shot transfer to a shifted domain, and a
real-data check on fluorescence nuclei. All offline."""
