"""The Nginx configuration template and its renderer."""
