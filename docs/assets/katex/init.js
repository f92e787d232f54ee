// Render the math that pymdownx.arithmatex (generic mode) leaves as \( \) and \[ \], with
// the KaTeX copy shipped in this folder (KaTeX 0.16.47, MIT licence, from its npm package;
// only the woff2 fonts): the site needs no network to show formulas.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
