"""The app's pages (run through st.navigation in app.py) and their shared helpers.

Streamlit still has a legacy mode for apps with a `pages/` folder: when the very first
request a server gets names a page's URL (e.g. a bookmark of /finetune), it runs that file
directly, without app.py's navigation and sidebar. Importing this package (every page
imports pages.common) switches the legacy mode off for the process and hands the request
to app.py, which then opens the page that was asked for.
"""
from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import get_script_run_ctx

_ctx = get_script_run_ctx()
_served_by_app = _ctx is not None and Path(_ctx.pages_manager.main_script_path).name == "app.py"  # not a page-only AppTest
if PagesManager.uses_pages_directory and _served_by_app:
    PagesManager.uses_pages_directory = False
    st.session_state["_deep_link"] = (st.context.url, st.query_params.to_dict())
    st.switch_page("app.py")
