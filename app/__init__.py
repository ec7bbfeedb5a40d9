"""The Streamlit explorer: `streamlit run app/main.py`."""
