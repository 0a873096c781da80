"""The Hugging Face Space: the Gradio app, ZeroGPU, server limits and deployment."""
