"""The command line and the Textual UI (kimi_desk.app). The only layer that may import textual."""
