"""Transfer Studio engine: devices, models, data and training loops.

No Streamlit in here. The app caches engine objects with st.cache_resource; the CLI
(`python -m engine ...`) calls the same functions.
"""
from engine.core.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
