"""Spatial inversion: steer each concept's cross-attention into its own region of the image.

`options` (settings, torch-free so the CLI stays fast), `phrases` (phrase -> token positions
through the tokenizer), `layout` (boxes, automatic layouts, masks on attention-map grids),
`attention` (processors that record attn2 probabilities), `guidance` (the loss and the latent
update). The pipeline that ties them together is `compinv.pipeline`.
"""
