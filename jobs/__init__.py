"""Entry points a user submits to Ray (thin scripts: parse config, call pipeline/ and models/)."""
