"""Applications built on the library: exporting a classical twin (``export``), uploading to the Hub (``hub``),
the demo (``demo``), its offline assets (``assets``) and the perplexity evaluation (``evaluation``)."""
