"""HeartBeat: controllable echocardiography video synthesis with multimodal-condition latent diffusion.

Importing the package has no side effects; see docs/ARCHITECTURE.md for the module map.
"""
__version__ = "0.1.0"
