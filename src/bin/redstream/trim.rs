//! `trim`: removes what every group has finished, after asking.

use redstream::{Admin, RedisBroker};
use serde::Serialize;

use crate::output::{confirm, print_json};
use crate::{Failure, stream_info};

#[derive(Serialize)]
struct TrimResult {
    #[serde(flatten)]
    plan: redstream::broker::admin::TrimPlan,
    dry_run: bool,
    removed: u64,
}

pub(crate) async fn trim(
    broker: &RedisBroker,
    stream: &str,
    dry_run: bool,
    yes: bool,
    json: bool,
) -> Result<(), Failure> {
    stream_info(broker, stream).await?;
    let plan = broker.trim_plan(stream).await?;
    let removed = match (&plan.min_id, dry_run) {
        (Some(min), false) if plan.removable > 0 => {
            confirm(
                &format!(
                    "remove {} entries below {min} from `{stream}`",
                    plan.removable
                ),
                yes,
            )?;
            broker.trim_acked_below(stream, min).await?
        }
        _ => 0,
    };
    if json {
        return print_json(&TrimResult {
            plan,
            dry_run,
            removed,
        });
    }
    for (group, id) in &plan.needed_by {
        println!("group `{group}` still needs entries from {id}");
    }
    match (&plan.min_id, dry_run) {
        (None, _) => {
            println!("nothing can be trimmed from `{stream}`: no group has finished any entry")
        }
        (Some(min), true) => println!(
            "would remove {} entries below {min} from `{stream}` (dry run)",
            plan.removable
        ),
        (Some(min), false) => println!("removed {removed} entries below {min} from `{stream}`"),
    }
    Ok(())
}
