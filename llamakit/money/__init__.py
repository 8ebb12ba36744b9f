"""Money in integer credits: a model's fees and the hold and settle arithmetic (`fees`), and what a credit is
worth in the operator's currency (`currency`)."""
