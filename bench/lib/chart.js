// @ts-check
/**
 * A grouped horizontal bar chart as hand-written SVG (no dependency): one group per benchmark row,
 * one bar per tool. Rows mix units (IOPS, MB/s), so each group is scaled to its own largest value
 * and every bar is labelled with its median; a thin line across the bar's end spans min..max over
 * the repetitions.
 */

/**
 * @typedef {object} ChartBar
 * @property {string} tool
 * @property {number} median
 * @property {number} min
 * @property {number} max
 */

/**
 * @typedef {object} ChartGroup
 * @property {string} label
 * @property {string} unit
 * @property {ChartBar[]} bars
 */

const PALETTE = ['#1f77b4', '#ff7f0e', '#d62728', '#2ca02c', '#7f7f7f', '#9467bd', '#8c564b', '#e377c2'];

/** @param {string} s */
function esc(s) {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** @param {number} v */
export function shortNumber(v) {
  if (!Number.isFinite(v)) return '-';
  if (v >= 1e6) return `${(v / 1e6).toFixed(2)}M`;
  if (v >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

/**
 * @param {{ title: string, subtitle: string[], tools: string[], groups: ChartGroup[] }} c
 * @returns {string} an SVG document
 */
export function barChartSvg(c) {
  const width = 980;
  const labelW = 230;
  const barAreaW = 620;
  const barH = 11;
  const barGap = 2;
  const groupGap = 12;
  const top = 36 + c.subtitle.length * 15 + 26;
  const color = (/** @type {string} */ tool) => PALETTE[Math.max(0, c.tools.indexOf(tool)) % PALETTE.length];
  /** @type {string[]} */
  const body = [];
  let y = top;
  for (const g of c.groups) {
    const bars = g.bars.filter((b) => Number.isFinite(b.median));
    const scale = Math.max(1e-9, ...bars.map((b) => Math.max(b.median, b.max)));
    const h = Math.max(1, bars.length) * (barH + barGap);
    body.push(`<text x="${labelW - 8}" y="${y + h / 2 + 4}" text-anchor="end" class="row">${esc(g.label)}</text>`);
    body.push(`<text x="${labelW - 8}" y="${y + h / 2 + 16}" text-anchor="end" class="unit">${esc(g.unit)}</text>`);
    if (bars.length === 0) body.push(`<text x="${labelW + 4}" y="${y + barH}" class="val">no data</text>`);
    bars.forEach((b, i) => {
      const by = y + i * (barH + barGap);
      const w = (b.median / scale) * barAreaW;
      body.push(`<rect x="${labelW}" y="${by}" width="${w.toFixed(1)}" height="${barH}" fill="${color(b.tool)}"><title>${esc(`${b.tool}: ${shortNumber(b.median)} ${g.unit} (min ${shortNumber(b.min)}, max ${shortNumber(b.max)})`)}</title></rect>`);
      if (b.max > b.min) {
        const x1 = labelW + (b.min / scale) * barAreaW;
        const x2 = labelW + (b.max / scale) * barAreaW;
        body.push(`<line x1="${x1.toFixed(1)}" x2="${x2.toFixed(1)}" y1="${by + barH / 2}" y2="${by + barH / 2}" class="range"/>`);
      }
      body.push(`<text x="${(labelW + Math.max(w, (b.max / scale) * barAreaW) + 4).toFixed(1)}" y="${by + barH - 1}" class="val">${esc(shortNumber(b.median))}</text>`);
    });
    y += h + groupGap;
    body.push(`<line x1="${labelW}" x2="${labelW + barAreaW}" y1="${y - groupGap / 2}" y2="${y - groupGap / 2}" class="sep"/>`);
  }
  const legend = c.tools
    .map((t, i) => `<rect x="${labelW + i * 150}" y="${top - 22}" width="12" height="12" fill="${color(t)}"/><text x="${labelW + i * 150 + 16}" y="${top - 12}" class="legend">${esc(t)}</text>`)
    .join('');
  const height = y + 10;
  const subtitle = c.subtitle.map((s, i) => `<text x="12" y="${40 + i * 15}" class="sub">${esc(s)}</text>`).join('');
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif">`,
    '<style>.title{font-size:16px;font-weight:bold}.sub{font-size:11px;fill:#444}.row{font-size:12px}.unit{font-size:10px;fill:#666}.val{font-size:10px;fill:#222}.legend{font-size:12px}.range{stroke:#000;stroke-width:1}.sep{stroke:#ddd;stroke-width:1}</style>',
    `<rect width="${width}" height="${height}" fill="#fff"/>`,
    `<text x="12" y="22" class="title">${esc(c.title)}</text>`,
    subtitle,
    legend,
    ...body,
    '</svg>',
    '',
  ].join('\n');
}
