"""The CLIP text encoder Stable Diffusion conditions on (transformers' CLIPTextModel layout, SD 1.x's CLIP ViT-L/14 and
SD 2.x's OpenCLIP ViT-H/14 text towers) in Flax, and a converter for its weights.

`model.CLIPTextModel` is the network (`input_ids (N, L) -> CLIPTextOutput(last_hidden_state, pooler_output, ...)`;
last_hidden_state is SD's conditioning), `model.SD2` / `model.SD1` its full-size configs, and
`convert.load_variables(path)` turns the user's own `text_encoder/model.safetensors` (+ `config.json`) into the Flax
variables, with numpy alone; `tokenizer.load_tokenizer(folder)` turns prompts into the ids it takes (the
`tokenizers` library over the folder's `tokenizer/` files). Nothing here downloads anything; README.md says where the weights
come from. Nothing is imported here, so importing the package stays cheap.
"""
