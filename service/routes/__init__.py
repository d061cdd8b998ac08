"""HTTP routes, one module per resource: txt2img (submit), jobs (look up, images, cancel), ops."""
