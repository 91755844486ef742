"""Toy experiments that illustrate the SVG paper's arguments on 2-D data (see velocity_field.py)."""
