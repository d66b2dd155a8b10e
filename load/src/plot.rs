//! The sweep's plot: appends/s (log scale) against writers per session, one line per strategy,
//! as an SVG file.

use std::path::Path;

use plotters::prelude::*;

use crate::error::LoadError;

/// One line of the plot: a strategy's appends/s at each writer count.
pub struct Series {
    /// The legend label.
    pub label: String,
    /// `(writers per session, appends/s)`, writers ascending.
    pub points: Vec<(usize, f64)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x55, 0x55, 0x55),
];

fn plot_error(error: impl std::fmt::Display) -> LoadError {
    LoadError::Plot(error.to_string())
}

/// Draws `series` to `path`. Writers are placed at their base-2 logarithm (1, 2, 4, ... 64 are
/// evenly spaced); values of zero (a strategy that acknowledged nothing) are left out, since a
/// log scale cannot show them. The y axis runs to ten times the highest value so that the
/// legend (upper left) sits above every line.
pub fn draw(path: &Path, title: &str, series: &[Series]) -> Result<(), LoadError> {
    let positive = || {
        series
            .iter()
            .flat_map(|line| line.points.iter().map(|&(_, rate)| rate))
            .filter(|&rate| rate > 0.0)
    };
    let lowest = positive().fold(f64::INFINITY, f64::min);
    let highest = positive().fold(0.0, f64::max);
    let (lowest, highest) = if lowest.is_finite() && highest > 0.0 {
        (lowest / 2.0, highest * 10.0)
    } else {
        (1.0, 10.0)
    };
    let max_writers = series
        .iter()
        .flat_map(|line| line.points.iter().map(|&(writers, _)| writers))
        .max()
        .unwrap_or(1)
        .max(2);
    let max_exponent = i32::try_from(max_writers.ilog2()).unwrap_or(6);

    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0i32..max_exponent, (lowest..highest).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("concurrent writers on the session")
        .y_desc("acknowledged appends/s (log scale)")
        .x_labels(usize::try_from(max_exponent).unwrap_or(6) + 1)
        .x_label_formatter(&|exponent| format!("{}", 1u64 << (*exponent).clamp(0, 62)))
        .y_label_formatter(&|rate| format_rate(*rate))
        .draw()
        .map_err(plot_error)?;

    for (index, line) in series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let points: Vec<(i32, f64)> = line
            .points
            .iter()
            .filter(|&&(writers, rate)| writers > 0 && rate > 0.0)
            .map(|&(writers, rate)| (i32::try_from(writers.ilog2()).unwrap_or(0), rate))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(line.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|point| Circle::new(point, 4, color.filled())),
            )
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn format_rate(rate: f64) -> String {
    if rate >= 1_000_000.0 {
        format!("{:.1}M", rate / 1_000_000.0)
    } else if rate >= 1_000.0 {
        format!("{:.0}k", rate / 1_000.0)
    } else {
        format!("{rate:.0}")
    }
}
